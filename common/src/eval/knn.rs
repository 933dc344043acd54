//! Exact k nearest neighbours by brute force (see [`super::distance`]).
//!
//! Neighbours are ordered by increasing distance, ties by increasing cell index; a cell is
//! never its own neighbour (an exact duplicate of it is, at distance 0).

use super::distance::{Embedding, Metric, Norms, Rows, scan, threads, to_distances};
use crate::error::{Error, Result};

/// The `k` nearest neighbours of every cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Knn {
    /// Neighbours per cell.
    pub k: usize,
    /// Neighbour indices, `n × k` row-major, nearest first.
    pub indices: Vec<u32>,
    /// Distances to them, `n × k` row-major, increasing.
    pub distances: Vec<f64>,
}

impl Knn {
    /// Number of cells.
    pub fn n(&self) -> usize {
        self.indices.len().checked_div(self.k).unwrap_or(0)
    }

    /// The neighbours of cell `i` and their distances.
    pub fn neighbors(&self, i: usize) -> (&[u32], &[f64]) {
        let r = i * self.k..(i + 1) * self.k;
        (&self.indices[r.clone()], &self.distances[r])
    }

    /// The first `k` neighbours of every cell (`k <= self.k`).
    pub fn truncate(&self, k: usize) -> Knn {
        assert!(k <= self.k, "Knn::truncate({k}) of a {}-NN", self.k);
        let n = self.n();
        let mut out = Knn {
            k,
            indices: Vec::with_capacity(n * k),
            distances: Vec::with_capacity(n * k),
        };
        for i in 0..n {
            let (idx, dist) = self.neighbors(i);
            out.indices.extend_from_slice(&idx[..k]);
            out.distances.extend_from_slice(&dist[..k]);
        }
        out
    }
}

/// Exact `k` nearest neighbours of every row of `emb` (itself excluded) under `metric`,
/// using all available cores. `k` must be in `1..n`.
pub fn knn(emb: &Embedding, k: usize, metric: Metric) -> Result<Knn> {
    knn_with(emb, k, metric, 0)
}

/// [`knn`] on `threads` threads (0: all available cores); the result does not depend on it.
pub fn knn_with(emb: &Embedding, k: usize, metric: Metric, threads: usize) -> Result<Knn> {
    if k == 0 || k >= emb.n() {
        return Err(Error::eval(format!(
            "k = {k} nearest neighbours of {} cells: k must be in 1..{}",
            emb.n(),
            emb.n()
        )));
    }
    let rows = Rows {
        emb: *emb,
        order: None,
    };
    let norms = Norms::new(emb, metric, None);
    Ok(knn_scan(&rows, &norms, k, threads, |q, r| q != r))
}

/// Fixed-capacity sorted lists of the nearest candidates of a block of queries.
#[derive(Debug, Clone)]
pub(crate) struct TopK {
    k: usize,
    len: Vec<usize>,
    dist: Vec<f64>,
    idx: Vec<u32>,
}

impl TopK {
    pub(crate) fn new(queries: usize, k: usize) -> Self {
        TopK {
            k,
            len: vec![0; queries],
            dist: vec![f64::INFINITY; queries * k],
            idx: vec![u32::MAX; queries * k],
        }
    }

    /// Distance a candidate must not exceed to enter query `q`'s list.
    #[inline]
    pub(crate) fn threshold(&self, q: usize) -> f64 {
        self.dist[q * self.k + self.k - 1]
    }

    /// Offers candidate `i` at distance `d` to query `q`'s list (ties: lower index first).
    #[inline]
    pub(crate) fn push(&mut self, q: usize, d: f64, i: u32) {
        let k = self.k;
        let (dist, idx) = (
            &mut self.dist[q * k..(q + 1) * k],
            &mut self.idx[q * k..(q + 1) * k],
        );
        let len = &mut self.len[q];
        if *len == k && (d, i) >= (dist[k - 1], idx[k - 1]) {
            return;
        }
        let mut p = (*len).min(k - 1);
        while p > 0 && (dist[p - 1], idx[p - 1]) > (d, i) {
            dist[p] = dist[p - 1];
            idx[p] = idx[p - 1];
            p -= 1;
        }
        dist[p] = d;
        idx[p] = i;
        if *len < k {
            *len += 1;
        }
    }

    /// Number of candidates held for query `q`.
    #[cfg(test)]
    pub(crate) fn len(&self, q: usize) -> usize {
        self.len[q]
    }

    /// The list of query `q`.
    pub(crate) fn get(&self, q: usize) -> (&[u32], &[f64]) {
        let r = q * self.k..q * self.k + self.len[q];
        (&self.idx[r.clone()], &self.dist[r])
    }
}

/// Offers the references `r0..r0 + dists.len()` (scan positions) to query `ql` of `top`;
/// `src` maps scan positions to cell indices and `admit(q_cell, r_cell)` filters candidates.
#[inline]
pub(crate) fn offer(
    top: &mut TopK,
    ql: usize,
    q_cell: usize,
    r0: usize,
    dists: &[f64],
    src: impl Fn(usize) -> usize,
    admit: &impl Fn(usize, usize) -> bool,
) {
    let mut t = top.threshold(ql);
    for (j, &d) in dists.iter().enumerate() {
        if d <= t {
            let r = src(r0 + j);
            if admit(q_cell, r) {
                top.push(ql, d, r as u32);
                t = top.threshold(ql);
            }
        }
    }
}

/// The `k` nearest admitted neighbours (`admit(q, r)` on cell indices) of every cell.
pub(crate) fn knn_scan(
    rows: &Rows,
    norms: &Norms,
    k: usize,
    threads_requested: usize,
    admit: impl Fn(usize, usize) -> bool + Sync,
) -> Knn {
    let src = |i: usize| rows.order.map_or(i, |o| o[i] as usize);
    let blocks = scan(
        rows,
        threads(threads_requested),
        |r| (r.start, TopK::new(r.len(), k)),
        |(start, top), q, r0, dots| {
            to_distances(norms, q, r0, dots);
            offer(top, q - *start, src(q), r0, dots, src, &admit);
        },
    );
    collect(rows, k, blocks)
}

/// Gathers per-block lists (in scan order) into a [`Knn`] in cell order; cells with fewer
/// than `k` admitted candidates are padded with index `u32::MAX` at infinite distance.
pub(crate) fn collect(rows: &Rows, k: usize, blocks: Vec<(usize, TopK)>) -> Knn {
    let n = rows.emb.n();
    let mut out = Knn {
        k,
        indices: vec![u32::MAX; n * k],
        distances: vec![f64::INFINITY; n * k],
    };
    for (start, top) in blocks {
        for ql in 0..top.len.len() {
            let cell = rows.order.map_or(start + ql, |o| o[start + ql] as usize);
            let (idx, dist) = top.get(ql);
            out.indices[cell * k..cell * k + idx.len()].copy_from_slice(idx);
            out.distances[cell * k..cell * k + dist.len()].copy_from_slice(dist);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::distance::{distance, dot_f32};
    use super::*;
    use crate::rng::Rng;

    /// Sorting all distances, ties by index.
    fn naive(emb: &Embedding, k: usize, metric: Metric) -> Knn {
        let sq = emb.sq_norms();
        let mut out = Knn {
            k,
            indices: vec![],
            distances: vec![],
        };
        for i in 0..emb.n() {
            let mut all: Vec<(f64, u32)> = (0..emb.n())
                .filter(|&j| j != i)
                .map(|j| {
                    let dot = dot_f32(emb.row(i), emb.row(j));
                    (distance(metric, dot, sq[i], sq[j]), j as u32)
                })
                .collect();
            all.sort_by(|a, b| a.partial_cmp(b).unwrap());
            out.indices.extend(all[..k].iter().map(|x| x.1));
            out.distances.extend(all[..k].iter().map(|x| x.0));
        }
        out
    }

    #[test]
    fn hand_checked_line() {
        // points on a line: 0, 1, 3, 6, 6
        let data = [0.0f32, 1.0, 3.0, 6.0, 6.0];
        let emb = Embedding::new(&data, 5, 1).unwrap();
        let r = knn(&emb, 2, Metric::Euclidean).unwrap();
        assert_eq!(r.indices, vec![1, 2, 0, 2, 1, 0, 4, 2, 3, 2]);
        assert_eq!(
            r.distances,
            vec![1.0, 3.0, 1.0, 2.0, 2.0, 3.0, 0.0, 3.0, 0.0, 3.0]
        );
        assert_eq!(r.truncate(1).indices, vec![1, 0, 1, 4, 3]);
        assert!(knn(&emb, 5, Metric::Euclidean).is_err());
    }

    #[test]
    fn matches_naive_sort_with_ties_and_threads() {
        let mut rng = Rng::new(11, &[]);
        let (n, d) = (331, 13);
        // Coarse values make many exactly tied distances.
        let data: Vec<f32> = (0..n * d).map(|_| (rng.below(5) as f32) - 2.0).collect();
        let emb = Embedding::new(&data, n, d).unwrap();
        for metric in [Metric::Euclidean, Metric::Cosine] {
            let want = naive(&emb, 7, metric);
            for t in [1, 2, 3] {
                let got = knn_with(&emb, 7, metric, t).unwrap();
                assert_eq!(got, want, "{metric:?} threads {t}");
            }
        }
    }

    #[test]
    fn topk_keeps_the_smallest_in_order() {
        let mut t = TopK::new(1, 3);
        for (d, i) in [(5.0, 0), (1.0, 1), (3.0, 2), (1.0, 0), (0.5, 9), (3.0, 1)] {
            t.push(0, d, i);
        }
        assert_eq!(t.get(0), (&[9u32, 0, 1][..], &[0.5, 1.0, 1.0][..]));
        assert_eq!(t.len(0), 3);
    }
}
