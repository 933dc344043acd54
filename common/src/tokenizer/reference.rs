//! The tokenizer as first written (before the speed-up), kept verbatim but for names: the
//! plain, obviously-correct definition the fast path must reproduce bit for bit, random
//! draws included. The tests compare against it and the `tokenize` bench measures it; not
//! for use otherwise.

use crate::config::model::special;
use crate::config::{Augment, Subsample};
use crate::rng::Rng;
use crate::tokenizer::{CellTokens, Tokenizer};

/// Quantile bins: a full `total_cmp` sort, `numpy.quantile` edges, a binary search.
pub fn reference_bins(values: &[f32], n_bins: usize) -> Vec<i64> {
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

/// Uniform below `n` (Lemire's method, the threshold computed on every draw).
fn reference_below(rng: &mut Rng, n: u64) -> u64 {
    assert!(n > 0);
    loop {
        let m = (rng.next_u64() as u128) * (n as u128);
        let lo = m as u64;
        if lo >= n.wrapping_neg() % n {
            return (m >> 64) as u64;
        }
    }
}

/// `k` of `0..n`: a partial Fisher–Yates shuffle of the whole list, then a sort.
fn reference_sample_sorted(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n);
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + reference_below(rng, (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// One view, step by step on fresh vectors.
pub fn reference_tokenize(
    tok: &Tokenizer,
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
    let bins = reference_bins(&v, tok.n_bins);
    let keep = tok.max_seq_len - 1;
    let chosen: Vec<usize> = if g.len() > keep {
        match tok.subsample {
            Subsample::Random => reference_sample_sorted(rng, g.len(), keep),
            Subsample::Top => {
                // A full sort by (value descending, salted hash of the position).
                let salt = rng.next_u64();
                let key = |i: usize| crate::rng::splitmix64(&mut (salt ^ i as u64));
                let mut idx: Vec<usize> = (0..g.len()).collect();
                idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(key(a).cmp(&key(b))));
                idx.truncate(keep);
                idx.sort_unstable();
                idx
            }
        }
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
        let k = ((tok.mask_ratio * n as f64).round() as usize).clamp(1, n);
        for p in reference_sample_sorted(rng, n, k) {
            t.masked[p + 1] = true;
        }
    }
    let mask_bin = tok.n_bins as i64;
    for i in 0..=n {
        let m = t.masked[i];
        t.input_bins
            .push(if m { mask_bin } else { t.target_bins[i] });
        t.input_values
            .push(if m { 0.0 } else { t.target_values[i] });
    }
    t
}
