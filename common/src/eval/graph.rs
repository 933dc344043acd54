//! The cell graph of scanpy's `pp.neighbors` and what is measured on it.
//!
//! [`umap_connectivities`] reproduces scanpy 1.11's `method="umap"` connectivities: scanpy
//! computes `n_neighbors` neighbours *including the cell itself* (so 14 others for the default
//! 15; exactly, with scikit-learn's brute force, below 4096 cells or 8192 cells with the
//! euclidean metric, and approximately with pynndescent above), then calls umap-learn 0.5's
//! `fuzzy_simplicial_set`: per cell, `rho` is the distance to the nearest other cell and
//! `sigma` is found by a binary search so that `Σ_j exp(-(d_j - rho) / sigma)` over the
//! other neighbours equals `log2(n_neighbors)`; the directed weights
//! `exp(-(d_ij - rho_i) / sigma_i)` are symmetrised as `a + aᵀ - a ∘ aᵀ`. The arithmetic of
//! umap's numba code (float32 weights) is reproduced: the weights equal umap's bit for bit
//! on the same neighbours.
//!
//! [`graph_connectivity`] is scIB's metric on that graph and [`modularity`] the quality
//! that Leiden optimises (see [`super::leiden`]).

use super::knn::Knn;
use crate::error::{Error, Result};

/// A weighted undirected graph: symmetric adjacency in CSR form (each edge stored in both
/// rows, columns increasing within a row).
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    /// Row offsets, `n + 1` entries.
    pub indptr: Vec<usize>,
    /// Column of every entry.
    pub indices: Vec<u32>,
    /// Weight of every entry.
    pub weights: Vec<f64>,
}

impl Graph {
    /// Number of nodes.
    pub fn n(&self) -> usize {
        self.indptr.len() - 1
    }

    /// Neighbours of node `i` and the weights of the edges to them.
    pub fn neighbors(&self, i: usize) -> (&[u32], &[f64]) {
        let r = self.indptr[i]..self.indptr[i + 1];
        (&self.indices[r.clone()], &self.weights[r])
    }

    /// Weighted degree of every node (a self-loop counted once).
    pub fn strengths(&self) -> Vec<f64> {
        (0..self.n())
            .map(|i| self.neighbors(i).1.iter().sum())
            .collect()
    }

    /// The graph of an undirected edge list (`(i, j, w)` with `i != j`, each edge once;
    /// weights of repeated edges add up).
    pub fn from_edges(n: usize, edges: &[(u32, u32, f64)]) -> Graph {
        let mut all: Vec<(u32, u32, f64)> = Vec::with_capacity(2 * edges.len());
        for &(i, j, w) in edges {
            all.push((i, j, w));
            all.push((j, i, w));
        }
        all.sort_by_key(|a| (a.0, a.1));
        let mut g = Graph {
            indptr: vec![0; n + 1],
            indices: Vec::new(),
            weights: Vec::new(),
        };
        for (i, j, w) in all {
            if g.indices.last() == Some(&j) && g.indptr[i as usize + 1] == g.indices.len() {
                *g.weights.last_mut().unwrap() += w;
                continue;
            }
            g.indices.push(j);
            g.weights.push(w);
            g.indptr[i as usize + 1] = g.indices.len();
        }
        for i in 0..n {
            g.indptr[i + 1] = g.indptr[i + 1].max(g.indptr[i]);
        }
        g
    }
}

/// umap-learn's `SMOOTH_K_TOLERANCE`.
const SMOOTH_K_TOLERANCE: f64 = 1e-5;
/// umap-learn's `MIN_K_DIST_SCALE`.
const MIN_K_DIST_SCALE: f64 = 1e-3;

/// umap-learn's `smooth_knn_dist` on one row of float32 distances whose first entry is the
/// cell itself (distance 0): returns `(sigma, rho)` with the arithmetic of umap's compiled
/// code (float32 distances and bounds, float64 sum).
fn smooth_knn_dist(row: &[f32], k: f64, mean_all: f64) -> (f32, f32) {
    let target = k.log2();
    let rho = row.iter().copied().find(|&d| d > 0.0).unwrap_or(0.0);
    let (mut lo, mut hi, mut mid) = (0.0f32, f32::MAX, 1.0f32);
    for _ in 0..64 {
        // numba evaluates the sum in float64 (checked bit for bit against umap-learn 0.5.12);
        // the distances, rho and the bounds are float32.
        let mut psum = 0.0f64;
        for &dist in &row[1..] {
            let d = dist - rho;
            psum += if d > 0.0 {
                (-(d as f64 / mid as f64)).exp()
            } else {
                1.0
            };
        }
        if (psum - target).abs() < SMOOTH_K_TOLERANCE {
            break;
        }
        if psum > target {
            hi = mid;
            mid = (lo + hi) / 2.0;
        } else {
            lo = mid;
            if hi >= f32::MAX {
                mid *= 2.0;
            } else {
                mid = (lo + hi) / 2.0;
            }
        }
    }
    let mut sigma = mid;
    let floor = if rho > 0.0 {
        let mean_row = row.iter().fold(0.0f32, |a, &b| a + b) as f64 / row.len() as f64;
        MIN_K_DIST_SCALE * mean_row
    } else {
        MIN_K_DIST_SCALE * mean_all
    };
    if (sigma as f64) < floor {
        sigma = floor as f32;
    }
    (sigma, rho)
}

/// scanpy's `umap` connectivities (see the module documentation) from exact neighbours:
/// uses the first `n_neighbors - 1` neighbours of every cell (`knn` must hold at least that
/// many, nearest first, the cell itself excluded).
pub fn umap_connectivities(knn: &Knn, n_neighbors: usize) -> Result<Graph> {
    let n = knn.n();
    if n_neighbors < 2 || knn.k + 1 < n_neighbors {
        return Err(Error::eval(format!(
            "n_neighbors = {n_neighbors} (counting the cell itself) needs 1 to {} neighbours per cell; have {}",
            knn.k, knn.k
        )));
    }
    let m = n_neighbors - 1;
    if let Some(i) = (0..n).find(|&i| knn.neighbors(i).0[..m].contains(&u32::MAX)) {
        return Err(Error::eval(format!(
            "cell {i} has fewer than {m} neighbours"
        )));
    }
    // Rows of float32 distances with the cell itself first, as scanpy passes them.
    let row = |i: usize| -> Vec<f32> {
        std::iter::once(0.0f32)
            .chain(knn.neighbors(i).1[..m].iter().map(|&d| d as f32))
            .collect()
    };
    let mean_all = {
        let total: f64 = (0..n)
            .map(|i| {
                knn.neighbors(i).1[..m]
                    .iter()
                    .map(|&d| d as f32 as f64)
                    .sum::<f64>()
            })
            .sum();
        total / (n * n_neighbors) as f64
    };
    // Directed weights, row-major CSR (columns sorted).
    let mut dir: Vec<Vec<(u32, f32)>> = Vec::with_capacity(n);
    for i in 0..n {
        let r = row(i);
        let (sigma, rho) = smooth_knn_dist(&r, n_neighbors as f64, mean_all);
        let mut out: Vec<(u32, f32)> = knn.neighbors(i).0[..m]
            .iter()
            .zip(&r[1..])
            .filter(|(j, _)| **j as usize != i)
            .map(|(&j, &d)| {
                let v = if d - rho <= 0.0 || sigma == 0.0 {
                    1.0f32
                } else {
                    (-((d - rho) / sigma)).exp()
                };
                (j, v)
            })
            .filter(|&(_, v)| v != 0.0)
            .collect();
        out.sort_by_key(|&(j, _)| j);
        dir.push(out);
    }
    // Transpose.
    let mut tr: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
    for (i, row) in dir.iter().enumerate() {
        for &(j, v) in row {
            tr[j as usize].push((i as u32, v));
        }
    }
    let mut g = Graph {
        indptr: vec![0],
        indices: Vec::new(),
        weights: Vec::new(),
    };
    for i in 0..n {
        // tr[i] is sorted by construction (rows visited in order).
        let (a, b) = (&dir[i], &tr[i]);
        let (mut p, mut q) = (0, 0);
        while p < a.len() || q < b.len() {
            let ja = a.get(p).map_or(u32::MAX, |x| x.0);
            let jb = b.get(q).map_or(u32::MAX, |x| x.0);
            let j = ja.min(jb);
            let va = if ja == j { a[p].1 } else { 0.0 };
            let vb = if jb == j { b[q].1 } else { 0.0 };
            p += (ja == j) as usize;
            q += (jb == j) as usize;
            let w = (va + vb) - va * vb;
            if w != 0.0 {
                g.indices.push(j);
                g.weights.push(w as f64);
            }
        }
        g.indptr.push(g.indices.len());
    }
    Ok(g)
}

/// Connected components of the subgraph induced by the nodes with `keep[i]`: component id
/// (`0..`, numbered by first node) of every kept node, `u32::MAX` for the others.
pub fn connected_components(graph: &Graph, keep: &[bool]) -> Vec<u32> {
    let n = graph.n();
    let mut comp = vec![u32::MAX; n];
    let mut next = 0u32;
    let mut stack = Vec::new();
    for s in 0..n {
        if !keep[s] || comp[s] != u32::MAX {
            continue;
        }
        comp[s] = next;
        stack.push(s);
        while let Some(v) = stack.pop() {
            for &u in graph.neighbors(v).0 {
                let u = u as usize;
                if keep[u] && comp[u] == u32::MAX {
                    comp[u] = next;
                    stack.push(u);
                }
            }
        }
        next += 1;
    }
    comp
}

/// scIB's graph connectivity: for each label, the fraction of its cells in the largest
/// connected component of the graph restricted to them; the mean over labels (present in
/// `labels`). 1 when every label's cells are connected.
pub fn graph_connectivity(graph: &Graph, labels: &[u32]) -> Result<f64> {
    let n = graph.n();
    if labels.len() != n {
        return Err(Error::eval(format!(
            "{} labels for {n} graph nodes",
            labels.len()
        )));
    }
    let mut uniq = labels.to_vec();
    uniq.sort_unstable();
    uniq.dedup();
    if uniq.is_empty() {
        return Err(Error::eval("graph connectivity of an empty graph"));
    }
    let mut total = 0.0;
    for &l in &uniq {
        let keep: Vec<bool> = labels.iter().map(|&x| x == l).collect();
        let comp = connected_components(graph, &keep);
        let mut sizes: Vec<usize> = Vec::new();
        for &c in comp.iter().filter(|&&c| c != u32::MAX) {
            if sizes.len() <= c as usize {
                sizes.resize(c as usize + 1, 0);
            }
            sizes[c as usize] += 1;
        }
        let members: usize = sizes.iter().sum();
        total += *sizes.iter().max().unwrap() as f64 / members as f64;
    }
    Ok(total / uniq.len() as f64)
}

/// Modularity with resolution `gamma` of the partition `membership` (igraph's
/// `Graph.modularity(membership, weights, resolution)` for an undirected graph):
/// `1/(2m) Σ_ij (A_ij - gamma k_i k_j / (2m)) δ(c_i, c_j)` with `k` the strengths and `2m`
/// their sum.
pub fn modularity(graph: &Graph, membership: &[u32], gamma: f64) -> f64 {
    let n = graph.n();
    assert_eq!(membership.len(), n, "membership length");
    let strength = graph.strengths();
    let two_m: f64 = strength.iter().sum();
    if two_m == 0.0 {
        return f64::NAN;
    }
    let k = membership.iter().max().map_or(0, |&c| c as usize + 1);
    let mut internal = vec![0.0f64; k];
    let mut tot = vec![0.0f64; k];
    for i in 0..n {
        let c = membership[i] as usize;
        tot[c] += strength[i];
        let (idx, w) = graph.neighbors(i);
        for (&j, &w) in idx.iter().zip(w) {
            if membership[j as usize] as usize == c {
                internal[c] += w;
            }
        }
    }
    (0..k)
        .map(|c| internal[c] - gamma * tot[c] * tot[c] / two_m)
        .sum::<f64>()
        / two_m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knn_of(k: usize, rows: &[(&[u32], &[f64])]) -> Knn {
        Knn {
            k,
            indices: rows.iter().flat_map(|r| r.0.iter().copied()).collect(),
            distances: rows.iter().flat_map(|r| r.1.iter().copied()).collect(),
        }
    }

    #[test]
    fn smooth_knn_dist_solves_the_equation() {
        let row = [0.0f32, 1.0, 1.5, 2.0, 4.0];
        let (sigma, rho) = smooth_knn_dist(&row, 5.0, 1.0);
        assert_eq!(rho, 1.0);
        let psum: f64 = row[1..]
            .iter()
            .map(|&d| (-((d - rho) as f64 / sigma as f64).max(0.0)).exp())
            .sum();
        assert!((psum - 5f64.log2()).abs() < 1e-4, "{psum}");
    }

    #[test]
    fn connectivities_are_a_fuzzy_union() {
        // Three cells, two neighbours each (n_neighbors = 3).
        let knn = knn_of(
            2,
            &[
                (&[1, 2], &[1.0, 2.0]),
                (&[0, 2], &[1.0, 1.5]),
                (&[1, 0], &[1.5, 2.0]),
            ],
        );
        let g = umap_connectivities(&knn, 3).unwrap();
        assert_eq!(g.indptr, vec![0, 2, 4, 6]);
        assert_eq!(g.indices, vec![1, 2, 0, 2, 0, 1]);
        // Nearest neighbours have weight 1 both ways: (1 + 1) - 1 = 1.
        assert_eq!(g.weights[0], 1.0);
        // 1 → 2: exp(-(1.5 - 1) / sigma_1); 2 → 1 is 2's nearest: 1.
        let (s1, _) = smooth_knn_dist(&[0.0, 1.0, 1.5], 3.0, 0.0);
        let a1 = (-(0.5f32 / s1)).exp();
        assert_eq!(g.weights[3], ((a1 + 1.0) - a1) as f64, "cells 1 and 2");
        // 0 → 2: exp(-(2 - 1) / sigma_0); 2 → 0: exp(-(2 - 1.5) / sigma_2).
        let (s0, _) = smooth_knn_dist(&[0.0, 1.0, 2.0], 3.0, 0.0);
        let (s2, _) = smooth_knn_dist(&[0.0, 1.5, 2.0], 3.0, 0.0);
        let a = (-(1.0f32 / s0)).exp();
        let b = (-(0.5f32 / s2)).exp();
        assert_eq!(g.weights[1], ((a + b) - a * b) as f64);
        assert_eq!(g.weights[1], g.weights[4]);
        assert!(umap_connectivities(&knn, 4).is_err());
    }

    #[test]
    fn components_and_connectivity_hand_checked() {
        // 0-1-2 and 3-4; labels: {0, 1, 3} and {2, 4}
        let g = Graph::from_edges(5, &[(0, 1, 1.0), (1, 2, 1.0), (3, 4, 2.0)]);
        assert_eq!(g.indptr, vec![0, 1, 3, 4, 5, 6]);
        assert_eq!(connected_components(&g, &[true; 5]), vec![0, 0, 0, 1, 1]);
        let labels = [0, 0, 1, 0, 1];
        // label 0: {0, 1} connected, 3 alone → 2/3; label 1: {2}, {4} → 1/2.
        let v = graph_connectivity(&g, &labels).unwrap();
        assert!((v - (2.0 / 3.0 + 0.5) / 2.0).abs() < 1e-15);
    }

    #[test]
    fn modularity_hand_checked() {
        // Two triangles joined by one edge, all weights 1: m = 7.
        let e = [
            (0, 1, 1.0),
            (1, 2, 1.0),
            (0, 2, 1.0),
            (3, 4, 1.0),
            (4, 5, 1.0),
            (3, 5, 1.0),
            (2, 3, 1.0),
        ];
        let g = Graph::from_edges(6, &e);
        // Q = Σ_c [L_c / m - γ (d_c / 2m)²] = 2 (3/7 - (7/14)²) = 6/7 - 1/2
        let q = modularity(&g, &[0, 0, 0, 1, 1, 1], 1.0);
        assert!((q - (6.0 / 7.0 - 0.5)).abs() < 1e-15, "{q}");
        let q = modularity(&g, &[0; 6], 0.5);
        assert!((q - (1.0 - 0.5)).abs() < 1e-15, "{q}");
    }
}
