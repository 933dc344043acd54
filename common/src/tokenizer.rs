//! Turns cells into model inputs: expressed-gene tokens with `[CLS]`, per-cell quantile
//! expression bins, random sub-sampling to the model length, expression masking, the
//! contrastive views' augmentations, and padding into a batch.
//!
//! Everything random is drawn from an [`Rng`] the caller derives from (seed, epoch,
//! cell, view), so a batch is a pure function of those numbers.

use crate::config::{Augment, ExpressionEncoding, ModelConfig, model::special};
use crate::rng::Rng;

/// Per-cell quantile bins of expressed values, scGPT-style.
///
/// Bin edges are the quantiles of the cell's values at `n_bins - 1` evenly spaced
/// probabilities in [0, 1] (linear interpolation, as `numpy.quantile`); a value's bin is
/// `1 +` the number of edges strictly below it (`1 + np.digitize(v, edges, right=True)`),
/// so expressed values fall in `1..=n_bins-1` (the last edge is the maximum, so at most
/// `n_bins - 2` edges lie below any value) and bin 0 stays "not expressed". Tied values
/// share the lowest bin they span: the deterministic lower end of scGPT's random
/// tie-breaking, so the many count-1 genes of a sparse cell all sit in bin 1.
pub fn quantile_bins(values: &[f32], n_bins: usize) -> Vec<i64> {
    if values.is_empty() {
        return Vec::new();
    }
    if n_bins <= 2 {
        return vec![1; values.len()];
    }
    let mut sorted: Vec<f32> = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    let n_edges = n_bins - 1;
    let last = (sorted.len() - 1) as f64;
    let edges: Vec<f32> = (0..n_edges)
        .map(|i| {
            let pos = last * i as f64 / (n_edges - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = pos.ceil() as usize;
            let frac = (pos - lo as f64) as f32;
            sorted[lo] + (sorted[hi] - sorted[lo]) * frac
        })
        .collect();
    values
        .iter()
        .map(|&v| {
            let below = edges.partition_point(|&e| e < v);
            1 + below as i64
        })
        .collect()
}

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
}

impl Tokenizer {
    /// The tokenizer for a model.
    pub fn new(m: &ModelConfig) -> Self {
        Tokenizer {
            max_seq_len: m.max_seq_len,
            expression: m.expression,
            n_bins: m.n_bins,
            mask_ratio: m.mask_ratio,
        }
    }

    /// Tokenizes one view of a cell from its expressed genes and log1p values.
    ///
    /// Applies gene dropout and Gaussian noise from `aug` (pass `None` for a clean view),
    /// bins the values, sub-samples to `max_seq_len - 1` genes, and masks
    /// `max(1, round(mask_ratio * n))` of them (none when `mask` is false).
    pub fn tokenize(
        &self,
        genes: &[u32],
        values: &[f32],
        aug: Option<&Augment>,
        mask: bool,
        rng: &mut Rng,
    ) -> CellTokens {
        let (mut g, mut v): (Vec<u32>, Vec<f32>) = (genes.to_vec(), values.to_vec());
        if let Some(a) = aug {
            if a.gene_dropout > 0.0 && g.len() > 1 {
                let keep: Vec<bool> = (0..g.len())
                    .map(|_| rng.uniform() >= a.gene_dropout)
                    .collect();
                if keep.iter().any(|&k| k) {
                    let mut w = 0;
                    for r in 0..g.len() {
                        if keep[r] {
                            g[w] = g[r];
                            v[w] = v[r];
                            w += 1;
                        }
                    }
                    g.truncate(w);
                    v.truncate(w);
                }
            }
            if a.noise_std > 0.0 {
                for x in v.iter_mut() {
                    *x = (*x + (a.noise_std * rng.normal()) as f32).max(1e-6);
                }
            }
        }
        let bins = quantile_bins(&v, self.n_bins);
        let keep = self.max_seq_len - 1;
        let chosen: Vec<usize> = if g.len() > keep {
            rng.sample_sorted(g.len(), keep)
        } else {
            (0..g.len()).collect()
        };
        let n = chosen.len();
        let mut t = CellTokens {
            genes: Vec::with_capacity(n + 1),
            input_bins: Vec::with_capacity(n + 1),
            target_bins: Vec::with_capacity(n + 1),
            input_values: Vec::with_capacity(n + 1),
            target_values: Vec::with_capacity(n + 1),
            masked: vec![false; n + 1],
        };
        t.genes.push(special::CLS);
        t.target_bins.push(0);
        t.target_values.push(0.0);
        for &c in &chosen {
            t.genes.push(g[c] as i64 + special::OFFSET);
            t.target_bins.push(bins[c]);
            t.target_values.push(v[c]);
        }
        if mask && n > 0 {
            let k = ((self.mask_ratio * n as f64).round() as usize).clamp(1, n);
            for p in rng.sample_sorted(n, k) {
                t.masked[p + 1] = true;
            }
        }
        let mask_bin = self.n_bins as i64;
        for i in 0..=n {
            let m = t.masked[i];
            t.input_bins
                .push(if m { mask_bin } else { t.target_bins[i] });
            t.input_values
                .push(if m { 0.0 } else { t.target_values[i] });
        }
        t
    }
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
}

impl Batch {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_match_numpy_quantile_digitize() {
        // numpy: edges = np.quantile([1,2,3,4,5], np.linspace(0,1,4)) = [1, 2.333, 3.667, 5]
        // bins = 1 + (#edges < v) = 1 + np.digitize(v, edges, right=True) = [1, 2, 3, 4, 4].
        assert_eq!(
            quantile_bins(&[1.0, 2.0, 3.0, 4.0, 5.0], 5),
            vec![1, 2, 3, 4, 4]
        );
        assert_eq!(quantile_bins(&[3.0, 3.0, 3.0], 51), vec![1, 1, 1]);
        assert_eq!(quantile_bins(&[], 51), Vec::<i64>::new());
        let b = quantile_bins(&(0..1000).map(|x| x as f32).collect::<Vec<_>>(), 51);
        assert_eq!((b[0], b[999]), (1, 50));
        assert!(b.windows(2).all(|w| w[0] <= w[1]));
    }

    fn tok(max: usize) -> Tokenizer {
        Tokenizer {
            max_seq_len: max,
            expression: ExpressionEncoding::Binned,
            n_bins: 11,
            mask_ratio: 0.25,
        }
    }

    #[test]
    fn tokenize_subsamples_masks_and_keeps_cls() {
        let genes: Vec<u32> = (0..100).collect();
        let vals: Vec<f32> = (0..100).map(|x| 1.0 + x as f32).collect();
        let t = tok(17).tokenize(&genes, &vals, None, true, &mut Rng::new(1, &[]));
        assert_eq!(t.genes.len(), 17);
        assert_eq!(
            (t.genes[0], t.input_bins[0], t.masked[0]),
            (special::CLS, 0, false)
        );
        assert_eq!(t.masked.iter().filter(|&&m| m).count(), 4); // round(0.25 * 16)
        for i in 1..17 {
            assert!(t.genes[i] >= special::OFFSET && t.genes[i] < 100 + special::OFFSET);
            assert!((1..=10).contains(&t.target_bins[i]));
            assert_eq!(
                t.input_bins[i],
                if t.masked[i] { 11 } else { t.target_bins[i] }
            );
            assert_eq!(
                t.input_values[i],
                if t.masked[i] { 0.0 } else { t.target_values[i] }
            );
        }
        assert!(t.genes[1..].windows(2).all(|w| w[0] < w[1]));
        // Same stream, same tokens.
        assert_eq!(
            t,
            tok(17).tokenize(&genes, &vals, None, true, &mut Rng::new(1, &[]))
        );
        // A one-gene cell still gets one masked token.
        let t = tok(17).tokenize(&[3], &[2.0], None, true, &mut Rng::new(1, &[]));
        assert_eq!(t.masked, vec![false, true]);
    }

    #[test]
    fn augmentations_drop_and_perturb() {
        let genes: Vec<u32> = (0..1000).collect();
        let vals = vec![1.0f32; 1000];
        let aug = Augment {
            gene_dropout: 0.5,
            noise_std: 0.1,
            ..Default::default()
        };
        let t = tok(2000).tokenize(&genes, &vals, Some(&aug), false, &mut Rng::new(2, &[]));
        let n = t.genes.len() - 1;
        assert!((400..600).contains(&n), "{n}");
        assert!(t.target_values[1..].iter().any(|&v| v != 1.0));
        assert!(!t.masked.iter().any(|&m| m));
    }

    #[test]
    fn cellmix_merges_sorted_rows() {
        let (g, v) = cellmix((&[1, 3], &[1.0, 1.0]), (&[2, 3], &[2.0, 2.0]), 0.5);
        assert_eq!(g, vec![1, 2, 3]);
        assert_eq!(v, vec![0.5, 1.0, 1.5]);
    }

    #[test]
    fn collate_pads_with_pad_token() {
        let genes: Vec<u32> = (0..5).collect();
        let vals = vec![1.0f32; 5];
        let t = tok(10);
        let a = t.tokenize(&genes, &vals, None, true, &mut Rng::new(1, &[]));
        let b = t.tokenize(&genes[..2], &vals[..2], None, true, &mut Rng::new(1, &[]));
        let batch = Batch::collate(&[a, b]);
        assert_eq!((batch.n, batch.len), (2, 6));
        assert_eq!(&batch.genes[9..12], &[special::PAD; 3]);
        assert!(!batch.masked[9..12].iter().any(|&m| m));
    }
}
