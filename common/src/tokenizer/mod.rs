//! Turns cells into model inputs: expressed-gene tokens with `[CLS]`, per-cell quantile
//! expression bins, random sub-sampling to the model length, expression masking, the
//! contrastive views' augmentations, and padding into a batch.
//!
//! Everything random is drawn from an [`Rng`] the caller derives from (seed, epoch,
//! cell, view), so a batch is a pure function of those numbers.

mod bins;
#[doc(hidden)]
pub mod reference;
#[cfg(test)]
mod tests;

use std::cell::RefCell;

use crate::config::{Augment, ExpressionEncoding, ModelConfig, Subsample, model::special};
use crate::rng::{Rng, for_each_set_bit};
use bins::Binner;
pub use bins::quantile_bins;

/// One tokenized view of a cell: `[CLS]` then the sampled expressed genes.
#[derive(Debug, Clone, PartialEq)]
pub struct CellTokens {
    /// Token ids: `[CLS]`, then `gene + OFFSET`.
    pub genes: Vec<i64>,
    /// Input bins (MASK bin = `n_bins` where masked; 0 for `[CLS]`).
    pub input_bins: Vec<i64>,
    /// True bins (MGEM targets for binned encoding).
    pub target_bins: Vec<i64>,
    /// Input values (0 where masked and for `[CLS]`).
    pub input_values: Vec<f32>,
    /// True log1p values (MGEM targets for continuous encoding).
    pub target_values: Vec<f32>,
    /// Whether each token's expression is masked (never `[CLS]`).
    pub masked: Vec<bool>,
}

/// Merges two sparse rows (sorted gene indices) as `(1 - alpha) * a + alpha * b` (CellMix).
pub fn cellmix(a: (&[u32], &[f32]), b: (&[u32], &[f32]), alpha: f32) -> (Vec<u32>, Vec<f32>) {
    let (mut i, mut j) = (0, 0);
    let (mut gi, mut gv) = (
        Vec::with_capacity(a.0.len() + b.0.len()),
        Vec::with_capacity(a.0.len() + b.0.len()),
    );
    while i < a.0.len() || j < b.0.len() {
        let take_a = j >= b.0.len() || (i < a.0.len() && a.0[i] <= b.0[j]);
        let take_b = i >= a.0.len() || (j < b.0.len() && b.0[j] <= a.0[i]);
        let g = if take_a { a.0[i] } else { b.0[j] };
        let va = if take_a { a.1[i] } else { 0.0 };
        let vb = if take_b { b.1[j] } else { 0.0 };
        gi.push(g);
        gv.push((1.0 - alpha) * va + alpha * vb);
        if take_a {
            i += 1;
        }
        if take_b {
            j += 1;
        }
    }
    (gi, gv)
}

/// Tokenizer settings taken from the model config.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenizer {
    /// Maximum tokens including `[CLS]`.
    pub max_seq_len: usize,
    /// Expression encoding (decides which inputs the model reads).
    pub expression: ExpressionEncoding,
    /// Number of bins (binned encoding).
    pub n_bins: usize,
    /// Fraction of gene tokens to mask.
    pub mask_ratio: f64,
    /// Which genes a training view keeps when more are expressed than fit.
    pub subsample: Subsample,
}

impl Tokenizer {
    /// The tokenizer for a model.
    pub fn new(m: &ModelConfig) -> Self {
        Tokenizer {
            max_seq_len: m.max_seq_len,
            expression: m.expression,
            n_bins: m.n_bins,
            mask_ratio: m.mask_ratio,
            subsample: m.subsample,
        }
    }

    /// Tokenizes one view of a cell from its expressed genes and log1p values.
    ///
    /// Applies gene dropout and Gaussian noise from `aug` (pass `None` for a clean view),
    /// bins the values, sub-samples to `max_seq_len - 1` genes (a uniform sample, or the
    /// top-expressed ones, per [`Subsample`]), and masks
    /// `max(1, round(mask_ratio * n))` of them (none when `mask` is false).
    ///
    /// Dropout keeps each gene independently with probability `1 - gene_dropout` (all of
    /// them if it would drop every gene); the bins are those of [`quantile_bins`] over all
    /// the genes the view keeps, before sub-sampling. Draws from `rng`, in order: one
    /// [`Rng::uniform`] per gene for dropout (gene kept iff it is `>= gene_dropout`; only
    /// when `gene_dropout > 0` and the cell has more than one gene), one [`Rng::normal`]
    /// per kept gene for the noise (when `noise_std > 0`), then, only when there are more
    /// genes than fit, [`Rng::sample_sorted`] for a random sub-sample or one
    /// [`Rng::next_u64`] that orders equal values for a top sub-sample, then
    /// [`Rng::sample_sorted`] for the mask.
    ///
    /// # Panics
    ///
    /// If `genes` and `values` differ in length.
    pub fn tokenize(
        &self,
        genes: &[u32],
        values: &[f32],
        aug: Option<&Augment>,
        mask: bool,
        rng: &mut Rng,
    ) -> CellTokens {
        assert_eq!(
            genes.len(),
            values.len(),
            "genes and values differ in length"
        );
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            self.tokenize_with(genes, values, aug, mask, rng, s)
        })
    }

    /// Tokenizes one cell for inference (`scfm embed`, evaluation): no augmentation and
    /// no masking. The bins are those of [`quantile_bins`] over all the cell's expressed
    /// genes (as a training view before sub-sampling); when more genes are expressed than
    /// `max_seq_len - 1`, the top-expressed ones are kept, ties broken by the lower gene
    /// index, so the result is a pure function of the cell. Kept genes stay in gene order,
    /// as in training.
    ///
    /// # Panics
    ///
    /// If `genes` and `values` differ in length.
    pub fn tokenize_inference(&self, genes: &[u32], values: &[f32]) -> CellTokens {
        assert_eq!(
            genes.len(),
            values.len(),
            "genes and values differ in length"
        );
        let n = genes.len().min(self.max_seq_len - 1);
        let all_bins = quantile_bins(values, self.n_bins);
        let keep: Vec<usize> = if genes.len() > n {
            let mut idx: Vec<usize> = (0..genes.len()).collect();
            // Highest value first; equal values by the lower gene index.
            let by_level = |&a: &usize, &b: &usize| {
                values[b]
                    .total_cmp(&values[a])
                    .then(genes[a].cmp(&genes[b]))
            };
            idx.select_nth_unstable_by(n - 1, by_level);
            idx.truncate(n);
            idx.sort_unstable_by_key(|&i| genes[i]);
            idx
        } else {
            (0..genes.len()).collect()
        };
        let mut t = CellTokens {
            genes: Vec::with_capacity(n + 1),
            input_bins: Vec::with_capacity(n + 1),
            target_bins: Vec::with_capacity(n + 1),
            input_values: Vec::with_capacity(n + 1),
            target_values: Vec::with_capacity(n + 1),
            masked: vec![false; n + 1],
        };
        t.genes.push(special::CLS);
        t.input_bins.push(0);
        t.input_values.push(0.0);
        for &i in &keep {
            t.genes.push(i64::from(genes[i]) + special::OFFSET);
            t.input_bins.push(all_bins[i]);
            t.input_values.push(values[i]);
        }
        t.target_bins = t.input_bins.clone();
        t.target_values = t.input_values.clone();
        t
    }

    /// [`Tokenizer::tokenize`] with explicit buffers.
    fn tokenize_with(
        &self,
        genes: &[u32],
        values: &[f32],
        aug: Option<&Augment>,
        mask: bool,
        rng: &mut Rng,
        s: &mut Scratch,
    ) -> CellTokens {
        let Scratch {
            genes: kept_genes,
            values: kept_values,
            binner,
            perm,
            bits,
        } = s;
        // The view's genes and values: the first `len` of `kept_genes` / `kept_values`
        // once dropped / perturbed.
        let (mut dropped, mut noisy, mut len) = (false, false, genes.len());
        if let Some(a) = aug {
            if a.gene_dropout > 0.0 && genes.len() > 1 {
                let w = dropout(genes, values, a.gene_dropout, rng, kept_genes, kept_values);
                // A view that would lose every gene keeps them all.
                if w > 0 {
                    (len, dropped) = (w, true);
                }
            }
            if a.noise_std > 0.0 {
                if !dropped {
                    kept_values.clear();
                    kept_values.extend_from_slice(values);
                }
                for x in &mut kept_values[..len] {
                    *x = (*x + (a.noise_std * rng.normal()) as f32).max(1e-6);
                }
                noisy = true;
            }
        }
        let g: &[u32] = if dropped { &kept_genes[..len] } else { genes };
        let v: &[f32] = if dropped || noisy {
            &kept_values[..len]
        } else {
            values
        };
        binner.fit(v, self.n_bins);
        // Column by column, `[CLS]` first.
        let n = len.min(self.max_seq_len - 1);
        fn column<T>(first: T, n: usize) -> Vec<T> {
            let mut c = Vec::with_capacity(n + 1);
            c.push(first);
            c
        }
        let mut t = CellTokens {
            genes: column(special::CLS, n),
            input_bins: column(0, n),
            target_bins: column(0, n),
            input_values: column(0.0, n),
            target_values: column(0.0, n),
            masked: column(false, n),
        };
        if len > n {
            match self.subsample {
                Subsample::Random => rng.sample_sorted_bits(len, n, perm, bits),
                Subsample::Top => top_bits(v, n, rng.next_u64(), perm, bits),
            }
            for_each_set_bit(bits, |c| {
                t.genes.push(i64::from(g[c]) + special::OFFSET);
                t.target_values.push(v[c]);
            });
        } else {
            t.genes
                .extend(g.iter().map(|&x| i64::from(x) + special::OFFSET));
            t.target_values.extend_from_slice(v);
        }
        binner.bin_all(&t.target_values[1..], &mut t.target_bins);
        if !mask || n == 0 {
            t.masked.resize(n + 1, false);
            t.input_bins.extend_from_slice(&t.target_bins[1..]);
            t.input_values.extend_from_slice(&t.target_values[1..]);
            return t;
        }
        let k = ((self.mask_ratio * n as f64).round() as usize).clamp(1, n);
        rng.sample_sorted_bits(n, k, perm, bits);
        t.masked.resize(n + 1, false);
        for_each_set_bit(bits, |p| t.masked[p + 1] = true);
        let mask_bin = self.n_bins as i64;
        let m = &t.masked[1..];
        t.input_bins.extend(
            t.target_bins[1..]
                .iter()
                .zip(m)
                .map(|(&b, &m)| if m { mask_bin } else { b }),
        );
        t.input_values.extend(
            t.target_values[1..]
                .iter()
                .zip(m)
                .map(|(&x, &m)| if m { 0.0 } else { x }),
        );
        t
    }
}

/// Sets in `bits` the positions of the `n` largest of `values` (`n < values.len()`);
/// equal values are ordered by a hash of their position salted with `salt`, so a view's
/// choice among equally expressed genes is random but reproducible.
fn top_bits(values: &[f32], n: usize, salt: u64, perm: &mut Vec<u32>, bits: &mut Vec<u64>) {
    let len = values.len();
    bits.clear();
    bits.resize(len.div_ceil(64), 0);
    if n == 0 {
        return;
    }
    let key = |i: u32| {
        let mut s = salt ^ u64::from(i);
        crate::rng::splitmix64(&mut s)
    };
    perm.clear();
    perm.extend(0..u32::try_from(len).expect("top_bits: length must fit in a u32"));
    perm.select_nth_unstable_by(n - 1, |&a, &b| {
        values[b as usize]
            .total_cmp(&values[a as usize])
            .then_with(|| key(a).cmp(&key(b)))
    });
    for &x in &perm[..n] {
        bits[x as usize / 64] |= 1 << (x % 64);
    }
}

/// Gene dropout: writes the genes (and their values) kept with probability `1 - p` each
/// to the front of `kept_genes` / `kept_values` (grown to at least `genes.len()`) and
/// returns how many. Gene `i` is kept iff the `i`-th [`Rng::uniform`] is `>= p`.
///
/// That test is done on the raw draw: `uniform() = (x >> 11) * 2^-53` with `x >> 11` below
/// `2^53` (exact in `f64`, as is scaling by a power of two), so `uniform() >= p` iff
/// `x >> 11 >= ceil(p * 2^53)` iff `x >= ceil(p * 2^53) << 11`.
fn dropout(
    genes: &[u32],
    values: &[f32],
    p: f64,
    rng: &mut Rng,
    kept_genes: &mut Vec<u32>,
    kept_values: &mut Vec<f32>,
) -> usize {
    const TWO_53: f64 = (1u64 << 53) as f64;
    let n = genes.len().min(values.len());
    let scaled = (p * TWO_53).ceil();
    if scaled.is_nan() || scaled >= TWO_53 {
        // p >= 1 (or NaN): no draw is kept.
        for _ in 0..n {
            rng.next_u64();
        }
        return 0;
    }
    // p > 0 in practice; a negative p keeps every draw (scaled <= 0 saturates to 0).
    let lim = (scaled as u64) << 11;
    // Only grown (every slot read is written first).
    if kept_genes.len() < n {
        kept_genes.resize(n, 0);
    }
    if kept_values.len() < n {
        kept_values.resize(n, 0.0);
    }
    let (kg, kv) = (&mut kept_genes[..n], &mut kept_values[..n]);
    let mut w = 0;
    // A local copy of the generator stays in registers (through `rng` its state would be
    // stored back to memory on every draw).
    let mut r = rng.clone();
    for (&g, &v) in genes[..n].iter().zip(&values[..n]) {
        let keep = r.next_u64() >= lim;
        // Branch-free compaction: always write, advance when kept (w <= i < n).
        kg[w] = g;
        kv[w] = v;
        w += usize::from(keep);
    }
    *rng = r;
    w
}

/// Per-thread buffers reused across [`Tokenizer::tokenize`] calls.
#[derive(Default)]
struct Scratch {
    genes: Vec<u32>,
    values: Vec<f32>,
    binner: Binner,
    perm: Vec<u32>,
    bits: Vec<u64>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A padded batch of tokenized sequences, row-major `[n, len]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// Number of sequences.
    pub n: usize,
    /// Padded length (the longest sequence).
    pub len: usize,
    /// Token ids (PAD = 0).
    pub genes: Vec<i64>,
    /// Input bins.
    pub input_bins: Vec<i64>,
    /// Target bins.
    pub target_bins: Vec<i64>,
    /// Input values.
    pub input_values: Vec<f32>,
    /// Target values.
    pub target_values: Vec<f32>,
    /// Masked positions.
    pub masked: Vec<bool>,
    /// The whole expression profile of each sequence's cell (log1p-normalised, every
    /// expressed gene, before augmentation) as CSR rows, for the GEPC decoder's targets;
    /// empty when not set (see [`Batch::set_profiles`]).
    pub profiles: Profiles,
}

/// Sparse rows of cell profiles: row `i` holds `genes[indptr[i]..indptr[i + 1]]` (gene
/// column indices, increasing) with their `values`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Profiles {
    /// Row offsets (`n + 1` entries; empty when there are no profiles).
    pub indptr: Vec<usize>,
    /// Gene column indices.
    pub genes: Vec<u32>,
    /// Values.
    pub values: Vec<f32>,
}

impl Profiles {
    /// Profiles from `(genes, values)` rows.
    pub fn from_rows<'a>(rows: impl IntoIterator<Item = (&'a [u32], &'a [f32])>) -> Self {
        let mut p = Profiles {
            indptr: vec![0],
            ..Profiles::default()
        };
        for (g, v) in rows {
            p.genes.extend_from_slice(g);
            p.values.extend_from_slice(v);
            p.indptr.push(p.genes.len());
        }
        p
    }

    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }

    /// The rows as a dense row-major `[n_rows, n_genes]` matrix.
    pub fn dense(&self, n_genes: usize) -> Vec<f32> {
        let mut out = vec![0.0; self.n_rows() * n_genes];
        for r in 0..self.n_rows() {
            let (a, b) = (self.indptr[r], self.indptr[r + 1]);
            for (&g, &v) in self.genes[a..b].iter().zip(&self.values[a..b]) {
                out[r * n_genes + g as usize] = v;
            }
        }
        out
    }
}

impl Batch {
    /// Sets the cells' profiles, one row per sequence (`rows.len()` must equal `n`).
    ///
    /// # Panics
    ///
    /// If the number of rows differs from the number of sequences.
    pub fn set_profiles(&mut self, profiles: Profiles) {
        assert_eq!(profiles.n_rows(), self.n, "one profile per sequence");
        self.profiles = profiles;
    }

    /// Pads `seqs` to the longest one.
    pub fn collate(seqs: &[CellTokens]) -> Batch {
        let n = seqs.len();
        let len = seqs.iter().map(|s| s.genes.len()).max().unwrap_or(0);
        let mut b = Batch {
            n,
            len,
            genes: vec![special::PAD; n * len],
            input_bins: vec![0; n * len],
            target_bins: vec![0; n * len],
            input_values: vec![0.0; n * len],
            target_values: vec![0.0; n * len],
            masked: vec![false; n * len],
            profiles: Profiles::default(),
        };
        for (i, s) in seqs.iter().enumerate() {
            let o = i * len;
            let k = s.genes.len();
            b.genes[o..o + k].copy_from_slice(&s.genes);
            b.input_bins[o..o + k].copy_from_slice(&s.input_bins);
            b.target_bins[o..o + k].copy_from_slice(&s.target_bins);
            b.input_values[o..o + k].copy_from_slice(&s.input_values);
            b.target_values[o..o + k].copy_from_slice(&s.target_values);
            b.masked[o..o + k].copy_from_slice(&s.masked);
        }
        b
    }

    /// Number of masked tokens.
    pub fn n_masked(&self) -> usize {
        self.masked.iter().filter(|&&m| m).count()
    }
}
