//! Silhouettes (scikit-learn's `silhouette_samples`) and the scIB average silhouette
//! widths: cell-type ASW `(mean silhouette + 1) / 2` (`scib_metrics.silhouette_label`) and
//! batch ASW (`scib_metrics.silhouette_batch`: for each label with at least two batches
//! and fewer batches than cells, the silhouettes of the batch labels among that label's
//! cells, scored `1 - |s|`, averaged over the label's cells, then over labels).
//!
//! One pass over all pairs computes, for every cell, the sums of its distances to the cells
//! of each label (and to the cells of each batch within its own label); the cells are
//! visited sorted by label and batch so that these sums are sums over contiguous runs. The
//! same pass can collect the k nearest neighbours (see [`silhouette_pass`]).

use super::distance::{Embedding, Metric, Norms, Rows, scan, threads, to_distances};
use super::knn::{Knn, TopK, collect, offer};
use crate::error::{Error, Result};

/// An error unless there are `n` labels (and `n` batch labels when given).
pub(crate) fn check_lengths(n: usize, labels: &[u32], batches: Option<&[u32]>) -> Result<()> {
    if labels.len() != n {
        return Err(Error::eval(format!(
            "{} labels for {n} cells",
            labels.len()
        )));
    }
    if let Some(b) = batches
        && b.len() != n
    {
        return Err(Error::eval(format!(
            "{} batch labels for {n} cells",
            b.len()
        )));
    }
    Ok(())
}

/// Dense codes `0..k` of `labels` in increasing label order, and `k`.
pub(crate) fn dense_codes(labels: &[u32]) -> (Vec<u32>, usize) {
    let mut uniq = labels.to_vec();
    uniq.sort_unstable();
    uniq.dedup();
    let code = labels
        .iter()
        .map(|l| uniq.binary_search(l).expect("label present") as u32)
        .collect();
    (code, uniq.len())
}

/// Distance sums of every cell, from [`silhouette_pass`].
#[derive(Debug, Clone)]
pub(crate) struct Pass {
    /// Dense label code of every cell.
    pub label: Vec<u32>,
    /// Number of labels.
    pub n_labels: usize,
    /// `sums[i * n_labels + c]`: sum of the distances of cell `i` to the cells of label `c`.
    pub sums: Vec<f64>,
    /// Dense batch code of every cell and number of batches, when batches were given.
    pub batch: Option<(Vec<u32>, usize)>,
    /// `batch_sums[i * n_batches + b]`: sum of the distances of cell `i` to the cells of
    /// batch `b` that have cell `i`'s label.
    pub batch_sums: Vec<f64>,
    /// The `knn_k` nearest neighbours (when `knn_k > 0`).
    pub knn: Option<Knn>,
}

/// Sum with four lanes (vectorisable, fixed order).
#[inline]
fn sum4(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut chunks = x.chunks_exact(4);
    for c in &mut chunks {
        for l in 0..4 {
            acc[l] += c[l];
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        acc[l] += v;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// Runs of equal values of `key` over `0..n` in the order `order`: `(value, start, end)`.
fn runs(order: &[u32], key: impl Fn(usize) -> u32) -> Vec<(u32, usize, usize)> {
    let mut out: Vec<(u32, usize, usize)> = Vec::new();
    for (p, &i) in order.iter().enumerate() {
        let v = key(i as usize);
        match out.last_mut() {
            Some(last) if last.0 == v => last.2 = p + 1,
            _ => out.push((v, p, p + 1)),
        }
    }
    out
}

/// Adds the sums of `dists` (references `r0..`) over the parts of `segments` that overlap
/// them into `sums[segment value]`.
#[inline]
fn add_runs(segments: &[(u32, usize, usize)], r0: usize, dists: &[f64], sums: &mut [f64]) {
    let r1 = r0 + dists.len();
    // first segment ending after r0
    let first = segments.partition_point(|s| s.2 <= r0);
    for &(v, s, e) in &segments[first..] {
        if s >= r1 {
            break;
        }
        let (a, b) = (s.max(r0), e.min(r1));
        sums[v as usize] += sum4(&dists[a - r0..b - r0]);
    }
}

/// One pass over all pairs under `metric`: per-label distance sums, per-batch sums within
/// each cell's label (with `batches`) and the `knn_k` nearest neighbours (if `knn_k > 0`).
pub(crate) fn silhouette_pass(
    emb: &Embedding,
    metric: Metric,
    labels: &[u32],
    batches: Option<&[u32]>,
    knn_k: usize,
    threads_requested: usize,
) -> Result<Pass> {
    let n = emb.n();
    check_lengths(n, labels, batches)?;
    if knn_k >= n {
        return Err(Error::eval(format!(
            "{knn_k} nearest neighbours of {n} cells: at most {}",
            n - 1
        )));
    }
    let (label, n_labels) = dense_codes(labels);
    let batch = batches.map(dense_codes);
    let bcode = |i: usize| batch.as_ref().map_or(0, |(b, _)| b[i]);
    let n_batches = batch.as_ref().map_or(0, |b| b.1);
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by_key(|&i| (label[i as usize], bcode(i as usize), i));
    let label_runs = runs(&order, |i| label[i]);
    // Batch runs, and for every label the range of its batch runs.
    let batch_runs = runs(&order, |i| label[i] * n_batches.max(1) as u32 + bcode(i));
    let batch_runs: Vec<(u32, usize, usize)> = batch_runs
        .into_iter()
        .map(|(v, s, e)| (v % n_batches.max(1) as u32, s, e))
        .collect();
    let mut label_batch_runs = vec![(0usize, 0usize); n_labels];
    {
        let mut p = 0;
        for (l, &(_, s, e)) in label_runs.iter().enumerate() {
            let first = p;
            while p < batch_runs.len() && batch_runs[p].2 <= e {
                p += 1;
            }
            debug_assert!(batch_runs[first].1 == s);
            label_batch_runs[l] = (first, p);
        }
    }
    let rows = Rows {
        emb: *emb,
        order: Some(&order),
    };
    let norms = Norms::new(emb, metric, Some(&order));
    let src = |p: usize| order[p] as usize;
    let admit = |q: usize, r: usize| q != r;
    struct State {
        start: usize,
        sums: Vec<f64>,
        batch_sums: Vec<f64>,
        top: Option<TopK>,
    }
    let blocks = scan(
        &rows,
        threads(threads_requested),
        |r| State {
            start: r.start,
            sums: vec![0.0; r.len() * n_labels],
            batch_sums: vec![
                0.0;
                if batch.is_some() {
                    r.len() * n_batches
                } else {
                    0
                }
            ],
            top: (knn_k > 0).then(|| TopK::new(r.len(), knn_k)),
        },
        |st, q, r0, dots| {
            to_distances(&norms, q, r0, dots);
            if (r0..r0 + dots.len()).contains(&q) {
                dots[q - r0] = 0.0;
            }
            let ql = q - st.start;
            add_runs(
                &label_runs,
                r0,
                dots,
                &mut st.sums[ql * n_labels..(ql + 1) * n_labels],
            );
            if batch.is_some() {
                let (a, b) = label_batch_runs[label[src(q)] as usize];
                add_runs(
                    &batch_runs[a..b],
                    r0,
                    dots,
                    &mut st.batch_sums[ql * n_batches..(ql + 1) * n_batches],
                );
            }
            if let Some(top) = st.top.as_mut() {
                offer(top, ql, src(q), r0, dots, src, &admit);
            }
        },
    );
    let mut sums = vec![0.0; n * n_labels];
    let mut batch_sums = vec![0.0; if batch.is_some() { n * n_batches } else { 0 }];
    let mut tops = Vec::new();
    for st in blocks {
        let len = st.sums.len() / n_labels;
        for ql in 0..len {
            let cell = src(st.start + ql);
            sums[cell * n_labels..(cell + 1) * n_labels]
                .copy_from_slice(&st.sums[ql * n_labels..(ql + 1) * n_labels]);
            if batch.is_some() {
                batch_sums[cell * n_batches..(cell + 1) * n_batches]
                    .copy_from_slice(&st.batch_sums[ql * n_batches..(ql + 1) * n_batches]);
            }
        }
        if let Some(top) = st.top {
            tops.push((st.start, top));
        }
    }
    let knn = (knn_k > 0).then(|| collect(&rows, knn_k, tops));
    Ok(Pass {
        label,
        n_labels,
        sums,
        batch,
        batch_sums,
        knn,
    })
}

/// Silhouette of one cell from its mean intra-cluster distance `a` (NaN for a singleton)
/// and its smallest mean distance to another cluster `b`, as scikit-learn: `(b - a) /
/// max(a, b)`, NaN (0/0, singletons) becoming 0.
#[inline]
fn silhouette(a: f64, b: f64) -> f64 {
    let s = (b - a) / if a.is_nan() { f64::NAN } else { a.max(b) };
    if s.is_nan() { 0.0 } else { s }
}

/// Silhouettes of all cells from per-cluster sums: `sums[i * k + c]` (cluster `c` of size
/// `sizes[c]`; absent clusters have size 0 and are ignored).
fn silhouettes_from_sums(code: &[u32], k: usize, sums: &[f64], sizes: &[usize]) -> Vec<f64> {
    (0..code.len())
        .map(|i| {
            let own = code[i] as usize;
            let s = &sums[i * k..(i + 1) * k];
            let a = s[own] / (sizes[own] as f64 - 1.0);
            let a = if sizes[own] <= 1 { f64::NAN } else { a };
            let b = (0..k)
                .filter(|&c| c != own && sizes[c] > 0)
                .map(|c| s[c] / sizes[c] as f64)
                .fold(f64::INFINITY, f64::min);
            silhouette(a, b)
        })
        .collect()
}

fn check_label_count(n_labels: usize, n: usize) -> Result<()> {
    if n_labels < 2 || n_labels > n - 1 {
        return Err(Error::eval(format!(
            "{n_labels} labels for {n} cells: a silhouette needs 2 to n - 1 = {} labels",
            n.saturating_sub(1)
        )));
    }
    Ok(())
}

/// Cell silhouettes of a pass's labels (`sklearn.metrics.silhouette_samples`).
pub(crate) fn label_silhouettes(p: &Pass) -> Result<Vec<f64>> {
    check_label_count(p.n_labels, p.label.len())?;
    let mut sizes = vec![0usize; p.n_labels];
    for &c in &p.label {
        sizes[c as usize] += 1;
    }
    Ok(silhouettes_from_sums(&p.label, p.n_labels, &p.sums, &sizes))
}

/// Batch ASW of a pass with batches (see the module documentation); `None` when no label
/// has at least two batches and fewer batches than cells.
pub(crate) fn batch_asw(p: &Pass) -> Option<f64> {
    let (batch, n_batches) = p.batch.as_ref()?;
    let n_batches = *n_batches;
    let mut members = vec![Vec::new(); p.n_labels];
    for (i, &l) in p.label.iter().enumerate() {
        members[l as usize].push(i);
    }
    let mut per_label = Vec::new();
    for cells in &members {
        let mut sizes = vec![0usize; n_batches];
        for &i in cells {
            sizes[batch[i] as usize] += 1;
        }
        let present = sizes.iter().filter(|&&s| s > 0).count();
        if present <= 1 || present == cells.len() {
            continue;
        }
        let total: f64 = cells
            .iter()
            .map(|&i| {
                let own = batch[i] as usize;
                let s = &p.batch_sums[i * n_batches..(i + 1) * n_batches];
                let a = if sizes[own] <= 1 {
                    f64::NAN
                } else {
                    s[own] / (sizes[own] as f64 - 1.0)
                };
                let b = (0..n_batches)
                    .filter(|&c| c != own && sizes[c] > 0)
                    .map(|c| s[c] / sizes[c] as f64)
                    .fold(f64::INFINITY, f64::min);
                1.0 - silhouette(a, b).abs()
            })
            .sum();
        per_label.push(total / cells.len() as f64);
    }
    (!per_label.is_empty()).then(|| per_label.iter().sum::<f64>() / per_label.len() as f64)
}

/// Silhouette of every cell for the clusters `labels` under `metric`
/// (`sklearn.metrics.silhouette_samples`): `(b - a) / max(a, b)` with `a` the mean distance
/// to the other cells of its cluster and `b` the smallest mean distance to the cells of
/// another cluster; 0 for cells of singleton clusters. Needs 2 to `n - 1` distinct labels.
/// `threads`: 0 for all cores.
pub fn silhouette_samples(
    emb: &Embedding,
    labels: &[u32],
    metric: Metric,
    threads: usize,
) -> Result<Vec<f64>> {
    let (_, k) = dense_codes(labels);
    check_label_count(k, emb.n())?;
    let p = silhouette_pass(emb, metric, labels, None, 0, threads)?;
    label_silhouettes(&p)
}

/// Mean of [`silhouette_samples`] (`sklearn.metrics.silhouette_score`).
pub fn silhouette_score(
    emb: &Embedding,
    labels: &[u32],
    metric: Metric,
    threads: usize,
) -> Result<f64> {
    let s = silhouette_samples(emb, labels, metric, threads)?;
    Ok(s.iter().sum::<f64>() / s.len() as f64)
}

/// scIB cell-type ASW: `(silhouette_score + 1) / 2` of the cell-type labels, in `[0, 1]`.
pub fn asw_celltype(
    emb: &Embedding,
    labels: &[u32],
    metric: Metric,
    threads: usize,
) -> Result<f64> {
    Ok((silhouette_score(emb, labels, metric, threads)? + 1.0) / 2.0)
}

/// scIB batch ASW (see the module documentation), in `[0, 1]` (1: batches mixed); `None`
/// when no label qualifies.
pub fn asw_batch(
    emb: &Embedding,
    labels: &[u32],
    batches: &[u32],
    metric: Metric,
    threads: usize,
) -> Result<Option<f64>> {
    let p = silhouette_pass(emb, metric, labels, Some(batches), 0, threads)?;
    Ok(batch_asw(&p))
}

#[cfg(test)]
mod tests {
    use super::super::distance::{distance, dot_f32};
    use super::*;
    use crate::rng::Rng;

    /// sklearn's definition, directly on all distances.
    fn naive(emb: &Embedding, labels: &[u32], metric: Metric) -> Vec<f64> {
        let n = emb.n();
        let sq = emb.sq_norms();
        let dist = |i: usize, j: usize| {
            if i == j {
                0.0
            } else {
                distance(metric, dot_f32(emb.row(i), emb.row(j)), sq[i], sq[j])
            }
        };
        let mut uniq = labels.to_vec();
        uniq.sort();
        uniq.dedup();
        (0..n)
            .map(|i| {
                let mean_to = |l: u32, skip_self: bool| {
                    let m: Vec<usize> = (0..n).filter(|&j| labels[j] == l).collect();
                    let s: f64 = m.iter().map(|&j| dist(i, j)).sum();
                    s / (m.len() - skip_self as usize) as f64
                };
                let own = labels[i];
                if labels.iter().filter(|&&l| l == own).count() == 1 {
                    return 0.0;
                }
                let a = mean_to(own, true);
                let b = uniq
                    .iter()
                    .filter(|&&l| l != own)
                    .map(|&l| mean_to(l, false))
                    .fold(f64::INFINITY, f64::min);
                let s = (b - a) / a.max(b);
                if s.is_nan() { 0.0 } else { s }
            })
            .collect()
    }

    #[test]
    fn hand_checked_line() {
        // clusters {0, 1} and {4}: cell 0: a = 1, b = 4 → 0.75; cell 1: a = 1, b = 3 → 2/3;
        // cell 2 is a singleton → 0.
        let emb = Embedding::new(&[0.0, 1.0, 4.0], 3, 1).unwrap();
        let s = silhouette_samples(&emb, &[7, 7, 9], Metric::Euclidean, 1).unwrap();
        assert_eq!(s, vec![0.75, 2.0 / 3.0, 0.0]);
        assert!(silhouette_samples(&emb, &[1, 1, 1], Metric::Euclidean, 1).is_err());
        assert!(silhouette_samples(&emb, &[1, 2, 3], Metric::Euclidean, 1).is_err());
        let asw = asw_celltype(&emb, &[7, 7, 9], Metric::Euclidean, 1).unwrap();
        assert!((asw - (1.0 + (0.75 + 2.0 / 3.0) / 3.0) / 2.0).abs() < 1e-15);
    }

    #[test]
    fn matches_the_definition_on_random_data() {
        let mut r = Rng::new(5, &[]);
        let (n, d) = (157, 9);
        let data: Vec<f32> = (0..n * d).map(|_| r.normal() as f32).collect();
        let labels: Vec<u32> = (0..n).map(|_| r.below(4) as u32 * 10).collect();
        let emb = Embedding::new(&data, n, d).unwrap();
        for metric in [Metric::Euclidean, Metric::Cosine] {
            let want = naive(&emb, &labels, metric);
            for t in [1, 2] {
                let got = silhouette_samples(&emb, &labels, metric, t).unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() < 1e-12, "{metric:?} cell {i}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn batch_asw_hand_checked_and_by_definition() {
        // Label 0: cells 0..4 on a line at 0, 1, 2, 3 with batches a, b, a, b;
        // label 1: three cells all in batch a (skipped: one batch);
        // label 2: two cells in batches a, b (skipped: as many batches as cells).
        let x = [0.0f32, 1.0, 2.0, 3.0, 50.0, 51.0, 52.0, 80.0, 81.0];
        let labels = [0, 0, 0, 0, 1, 1, 1, 2, 2];
        let batches = [0, 1, 0, 1, 0, 0, 0, 0, 1];
        let emb = Embedding::new(&x, 9, 1).unwrap();
        let got = asw_batch(&emb, &labels, &batches, Metric::Euclidean, 1)
            .unwrap()
            .unwrap();
        let sub = Embedding::new(&x[..4], 4, 1).unwrap();
        let s = naive(&sub, &[0, 1, 0, 1], Metric::Euclidean);
        let want = s.iter().map(|v| 1.0 - v.abs()).sum::<f64>() / 4.0;
        // cell 0: a = 2, b = (1 + 3) / 2 = 2 → 0; cell 1: a = 2, b = (1 + 1) / 2 = 1 → -1/2.
        assert_eq!(s[0], 0.0);
        assert_eq!(s[1], -0.5);
        assert!((got - want).abs() < 1e-15, "{got} vs {want}");
        let none = asw_batch(&emb, &labels, &[0; 9], Metric::Euclidean, 1).unwrap();
        assert_eq!(none, None);
    }

    #[test]
    fn pass_neighbours_equal_knn() {
        let mut r = Rng::new(6, &[]);
        let (n, d) = (211, 5);
        let data: Vec<f32> = (0..n * d).map(|_| r.below(4) as f32).collect();
        let labels: Vec<u32> = (0..n).map(|_| r.below(3) as u32).collect();
        let batches: Vec<u32> = (0..n).map(|_| r.below(2) as u32).collect();
        let emb = Embedding::new(&data, n, d).unwrap();
        let p = silhouette_pass(&emb, Metric::Euclidean, &labels, Some(&batches), 6, 2).unwrap();
        let want = super::super::knn::knn_with(&emb, 6, Metric::Euclidean, 1).unwrap();
        assert_eq!(p.knn.unwrap(), want);
    }
}
