//! Leiden community detection (Traag, Waltman & van Eck 2019) maximising modularity with a
//! resolution (leidenalg's `RBConfigurationVertexPartition`, what `scanpy.tl.leiden` uses).
//!
//! The structure follows leidenalg 0.10+ (`Optimiser::optimise_partition`), scanpy 1.11's
//! default backend (`flavor="leidenalg"`, `n_iterations=-1`, edge weights on): each
//! iteration runs, level after level, (1) fast local moving of nodes between communities
//! from a queue (random initial order; a node may also move to an empty community; only
//! strictly improving moves), (2) refinement: within every community, starting from
//! singletons, each still-single node (random order) joins the neighbouring sub-community of
//! the same community that improves the quality most, if none decreases it, and (3)
//! aggregation of the refined sub-communities into nodes whose initial community is their
//! community before refinement; levels continue while aggregation shrinks the graph and
//! there are more nodes than communities. Iterations repeat until one moves no node (or
//! `n_iterations` times when positive). Random streams come from scfm's generator, so
//! partitions are deterministic for a seed but not leidenalg's.
//!
//! The quality of a partition is `Σ_c (e_c - γ K_c² / (2m))` (`e_c`: weight inside `c`, `K_c`:
//! its total strength); [`super::graph::modularity`] is that divided by `m`.

use super::distance::par_map;
use super::graph::Graph;
use super::scores::{adjusted_rand_score, normalized_mutual_info_score};
use crate::error::{Error, Result};
use crate::rng::Rng;
use serde::Serialize;

/// One level's graph: no self-loops (they do not change any move's gain); node strengths
/// carry the weight of the original graph.
struct Level {
    indptr: Vec<usize>,
    indices: Vec<u32>,
    weights: Vec<f64>,
    strength: Vec<f64>,
}

impl Level {
    fn n(&self) -> usize {
        self.strength.len()
    }

    fn neighbors(&self, v: usize) -> (&[u32], &[f64]) {
        let r = self.indptr[v]..self.indptr[v + 1];
        (&self.indices[r.clone()], &self.weights[r])
    }

    /// The graph of `membership`'s communities (`0..k`): summed strengths, summed weights
    /// between different communities.
    fn aggregate(&self, membership: &[u32], k: usize) -> Level {
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); k];
        for (v, &c) in membership.iter().enumerate() {
            members[c as usize].push(v as u32);
        }
        let mut acc = vec![0.0f64; k];
        let mut touched: Vec<u32> = Vec::new();
        let mut out = Level {
            indptr: vec![0],
            indices: Vec::new(),
            weights: Vec::new(),
            strength: vec![0.0; k],
        };
        for (c, vs) in members.iter().enumerate() {
            for &v in vs {
                out.strength[c] += self.strength[v as usize];
                let (idx, w) = self.neighbors(v as usize);
                for (&u, &w) in idx.iter().zip(w) {
                    let cu = membership[u as usize];
                    if cu as usize == c {
                        continue;
                    }
                    if acc[cu as usize] == 0.0 {
                        touched.push(cu);
                    }
                    acc[cu as usize] += w;
                }
            }
            touched.sort_unstable();
            for &t in &touched {
                out.indices.push(t);
                out.weights.push(acc[t as usize]);
                acc[t as usize] = 0.0;
            }
            touched.clear();
            out.indptr.push(out.indices.len());
        }
        out
    }
}

/// A partition of a level's nodes with community totals.
struct Partition {
    membership: Vec<u32>,
    /// Total strength of every community id (`0..n`).
    total: Vec<f64>,
    /// Number of nodes of every community id.
    size: Vec<u32>,
    /// Unused community ids.
    empty: Vec<u32>,
}

impl Partition {
    fn new(level: &Level, membership: Vec<u32>) -> Self {
        let n = level.n();
        let mut total = vec![0.0; n];
        let mut size = vec![0u32; n];
        for (v, &c) in membership.iter().enumerate() {
            total[c as usize] += level.strength[v];
            size[c as usize] += 1;
        }
        let empty = (0..n as u32)
            .rev()
            .filter(|&c| size[c as usize] == 0)
            .collect();
        Partition {
            membership,
            total,
            size,
            empty,
        }
    }

    fn move_node(&mut self, v: usize, to: u32, strength: f64) {
        let from = self.membership[v] as usize;
        self.total[from] -= strength;
        self.size[from] -= 1;
        if self.size[from] == 0 {
            self.total[from] = 0.0;
            self.empty.push(from as u32);
        }
        let to_us = to as usize;
        if self.size[to_us] == 0 {
            let p = self.empty.iter().rposition(|&c| c == to).expect("empty id");
            self.empty.swap_remove(p);
        }
        self.total[to_us] += strength;
        self.size[to_us] += 1;
        self.membership[v] = to;
    }

    /// Renumbers communities `0..k` in order of first node; returns `k`.
    fn renumber(&mut self) -> usize {
        let n = self.membership.len();
        let mut map = vec![u32::MAX; n];
        let mut k = 0u32;
        for c in self.membership.iter_mut() {
            if map[*c as usize] == u32::MAX {
                map[*c as usize] = k;
                k += 1;
            }
            *c = map[*c as usize];
        }
        k as usize
    }
}

/// Per-node scratch: weight from the node to every neighbouring community.
struct Scratch {
    weight: Vec<f64>,
    seen: Vec<bool>,
    comms: Vec<u32>,
}

impl Scratch {
    fn new(n: usize) -> Self {
        Scratch {
            weight: vec![0.0; n],
            seen: vec![false; n],
            comms: Vec::new(),
        }
    }

    /// Collects the communities of `v`'s neighbours (those with `allow(u)`) and the weights
    /// to them, in order of first appearance.
    fn collect(
        &mut self,
        level: &Level,
        part: &Partition,
        v: usize,
        allow: impl Fn(usize) -> bool,
    ) {
        for &c in &self.comms {
            self.weight[c as usize] = 0.0;
            self.seen[c as usize] = false;
        }
        self.comms.clear();
        let (idx, w) = level.neighbors(v);
        for (&u, &w) in idx.iter().zip(w) {
            if !allow(u as usize) {
                continue;
            }
            let c = part.membership[u as usize];
            if !self.seen[c as usize] {
                self.seen[c as usize] = true;
                self.comms.push(c);
            }
            self.weight[c as usize] += w;
        }
    }
}

/// Gain of `v` (strength `k`) joining community `c` (totals without `v`) relative to being
/// alone: `w(v, c) - γ k K_c / 2m`.
#[inline]
fn gain(w: f64, k: f64, total_c: f64, gamma: f64, two_m: f64) -> f64 {
    w - gamma * k * total_c / two_m
}

/// Smallest improvement considered a move (guards against moves that only round).
fn min_improvement(k: f64) -> f64 {
    1e-13 * k.max(f64::MIN_POSITIVE)
}

/// Fast local moving; returns whether any node moved.
fn move_nodes(level: &Level, part: &mut Partition, gamma: f64, two_m: f64, rng: &mut Rng) -> bool {
    let n = level.n();
    let mut order: Vec<u32> = (0..n as u32).collect();
    rng.shuffle(&mut order);
    let mut queue: std::collections::VecDeque<u32> = order.into_iter().collect();
    let mut stable = vec![false; n];
    let mut scratch = Scratch::new(n);
    let mut moved = false;
    while let Some(v) = queue.pop_front() {
        let v = v as usize;
        let k = level.strength[v];
        let own = part.membership[v];
        scratch.collect(level, part, v, |u| u != v);
        let own_w = if scratch.seen[own as usize] {
            scratch.weight[own as usize]
        } else {
            0.0
        };
        let stay = gain(own_w, k, part.total[own as usize] - k, gamma, two_m);
        let mut best = (own, 0.0f64);
        for &c in &scratch.comms {
            if c == own {
                continue;
            }
            let diff = gain(
                scratch.weight[c as usize],
                k,
                part.total[c as usize],
                gamma,
                two_m,
            ) - stay;
            if diff > best.1 {
                best = (c, diff);
            }
        }
        // An empty community (gain 0), when v is not alone.
        if part.size[own as usize] > 1 && -stay > best.1 {
            best = (*part.empty.last().expect("an empty id exists"), -stay);
        }
        stable[v] = true;
        if best.0 != own && best.1 > min_improvement(k) {
            part.move_node(v, best.0, k);
            moved = true;
            for &u in level.neighbors(v).0 {
                let u = u as usize;
                if stable[u] && part.membership[u] != best.0 {
                    stable[u] = false;
                    queue.push_back(u as u32);
                }
            }
        }
    }
    moved
}

/// Refinement: singletons merged within the communities of `coarse`.
fn refine(level: &Level, coarse: &[u32], gamma: f64, two_m: f64, rng: &mut Rng) -> Partition {
    let n = level.n();
    let mut part = Partition::new(level, (0..n as u32).collect());
    let mut order: Vec<u32> = (0..n as u32).collect();
    rng.shuffle(&mut order);
    let mut scratch = Scratch::new(n);
    for v in order {
        let v = v as usize;
        let own = part.membership[v];
        if part.size[own as usize] != 1 {
            continue;
        }
        let k = level.strength[v];
        scratch.collect(level, &part, v, |u| u != v && coarse[u] == coarse[v]);
        // v is alone: staying has gain 0; join the best community if it does not lose.
        let mut best: Option<(u32, f64)> = None;
        for &c in &scratch.comms {
            let g = gain(
                scratch.weight[c as usize],
                k,
                part.total[c as usize],
                gamma,
                two_m,
            );
            if g >= 0.0 && best.is_none_or(|b| g > b.1) {
                best = Some((c, g));
            }
        }
        if let Some((c, _)) = best {
            part.move_node(v, c, k);
        }
    }
    part
}

/// One call of leidenalg's `optimise_partition` from `membership`; returns whether a node
/// moved.
fn optimise_once(
    graph: &Level,
    membership: &mut [u32],
    gamma: f64,
    two_m: f64,
    rng: &mut Rng,
) -> bool {
    let n0 = graph.n();
    let mut node_of: Vec<u32> = (0..n0 as u32).collect(); // original node → level node
    let mut owned: Option<Level> = None;
    let mut part = Partition::new(graph, membership.to_vec());
    let mut changed = false;
    loop {
        let level = owned.as_ref().unwrap_or(graph);
        changed |= move_nodes(level, &mut part, gamma, two_m, rng);
        let n_comms = part.renumber();
        for (o, m) in node_of.iter().zip(membership.iter_mut()) {
            *m = part.membership[*o as usize];
        }
        let mut refined = refine(level, &part.membership, gamma, two_m, rng);
        let n_refined = refined.renumber();
        if !(n_refined < level.n() && level.n() > n_comms) {
            break;
        }
        let next = level.aggregate(&refined.membership, n_refined);
        let mut next_membership = vec![0u32; n_refined];
        for (v, &r) in refined.membership.iter().enumerate() {
            next_membership[r as usize] = part.membership[v];
        }
        for o in node_of.iter_mut() {
            *o = refined.membership[*o as usize];
        }
        part = Partition::new(&next, next_membership);
        owned = Some(next);
    }
    changed
}

/// Leiden communities of `graph` (see the module documentation) at resolution `gamma`:
/// community of every node, numbered by decreasing size (ties: first node). `n_iterations`:
/// negative to iterate until no node moves (scanpy's default `-1`), else that many
/// iterations. Deterministic for a `seed`.
pub fn leiden(graph: &Graph, gamma: f64, seed: u64, n_iterations: i32) -> Vec<u32> {
    let n = graph.n();
    let mut indices = Vec::with_capacity(graph.indices.len());
    let mut weights = Vec::with_capacity(graph.weights.len());
    let mut indptr = vec![0];
    for i in 0..n {
        let (idx, w) = graph.neighbors(i);
        for (&j, &w) in idx.iter().zip(w) {
            if j as usize != i {
                indices.push(j);
                weights.push(w);
            }
        }
        indptr.push(indices.len());
    }
    let level = Level {
        indptr,
        indices,
        weights,
        strength: graph.strengths(),
    };
    let two_m: f64 = level.strength.iter().sum();
    let mut membership: Vec<u32> = (0..n as u32).collect();
    if two_m > 0.0 {
        let mut rng = Rng::new(seed, &[0x001E_1DE4, gamma.to_bits()]);
        let mut it = 0;
        // Safety net: an iteration that moves nodes strictly improves the quality.
        let max_iterations = if n_iterations < 0 { 1000 } else { n_iterations };
        while it < max_iterations {
            it += 1;
            if !optimise_once(&level, &mut membership, gamma, two_m, &mut rng) {
                break;
            }
        }
    }
    // Number by decreasing size, ties by first node.
    let k = membership.iter().max().map_or(0, |&c| c as usize + 1);
    let mut size = vec![0usize; k];
    let mut first = vec![usize::MAX; k];
    for (v, &c) in membership.iter().enumerate() {
        size[c as usize] += 1;
        first[c as usize] = first[c as usize].min(v);
    }
    let mut ids: Vec<usize> = (0..k).filter(|&c| size[c] > 0).collect();
    ids.sort_by_key(|&c| (std::cmp::Reverse(size[c]), first[c]));
    let mut map = vec![0u32; k];
    for (new, &c) in ids.iter().enumerate() {
        map[c] = new as u32;
    }
    membership.iter().map(|&c| map[c as usize]).collect()
}

/// One resolution of [`leiden_best_nmi`].
#[derive(Debug, Clone, Serialize)]
pub struct LeidenRun {
    /// The resolution.
    pub resolution: f64,
    /// Number of communities.
    pub n_clusters: usize,
    /// NMI of the communities against the labels.
    pub nmi: f64,
    /// ARI of the communities against the labels.
    pub ari: f64,
}

/// Result of [`leiden_best_nmi`]: the run with the highest NMI (the first on ties) and all runs.
#[derive(Debug, Clone, Serialize)]
pub struct LeidenChoice {
    /// The chosen run.
    pub best: LeidenRun,
    /// Every resolution, in the order given.
    pub runs: Vec<LeidenRun>,
    /// The communities of the chosen run.
    #[serde(skip)]
    pub membership: Vec<u32>,
}

/// scIB's `cluster_optimal_resolution`: Leiden at every resolution of `resolutions` (e.g.
/// [`default_resolutions`]), keeping the partition with the highest NMI against `labels`.
/// Resolutions run on `threads` threads (0: all cores); the result does not depend on it.
pub fn leiden_best_nmi(
    graph: &Graph,
    labels: &[u32],
    resolutions: &[f64],
    seed: u64,
    n_iterations: i32,
    threads: usize,
) -> Result<LeidenChoice> {
    if labels.len() != graph.n() {
        return Err(Error::eval(format!(
            "{} labels for {} graph nodes",
            labels.len(),
            graph.n()
        )));
    }
    if resolutions.is_empty() || resolutions.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        return Err(Error::eval(format!(
            "Leiden resolutions {resolutions:?}: need at least one, all finite and > 0"
        )));
    }
    let t = super::distance::threads(threads);
    let run = |r: f64| {
        let m = leiden(graph, r, seed, n_iterations);
        let n_clusters = m.iter().max().map_or(0, |&c| c as usize + 1);
        let info = LeidenRun {
            resolution: r,
            n_clusters,
            nmi: normalized_mutual_info_score(labels, &m),
            ari: adjusted_rand_score(labels, &m),
        };
        (info, m)
    };
    let results = par_map(resolutions.len(), t, |i| run(resolutions[i]));
    let mut best = 0;
    for (i, (r, _)) in results.iter().enumerate() {
        if r.nmi > results[best].0.nmi {
            best = i;
        }
    }
    let membership = results[best].1.clone();
    let runs: Vec<LeidenRun> = results.into_iter().map(|x| x.0).collect();
    Ok(LeidenChoice {
        best: runs[best].clone(),
        runs,
        membership,
    })
}

/// scIB's resolution grid: 0.1, 0.2, …, 2.0.
pub fn default_resolutions() -> Vec<f64> {
    (1..=20).map(|i| 2.0 * i as f64 / 20.0).collect()
}

#[cfg(test)]
mod tests {
    use super::super::graph::modularity;
    use super::*;

    /// `c` cliques of `s` nodes (weight 1 inside), consecutive cliques joined by one edge.
    fn ring_of_cliques(c: usize, s: usize) -> Graph {
        let mut e = Vec::new();
        for q in 0..c {
            let b = q * s;
            for i in 0..s {
                for j in i + 1..s {
                    e.push(((b + i) as u32, (b + j) as u32, 1.0));
                }
            }
            e.push(((b + s - 1) as u32, (((q + 1) % c) * s) as u32, 1.0));
        }
        Graph::from_edges(c * s, &e)
    }

    #[test]
    fn finds_the_cliques() {
        let g = ring_of_cliques(8, 5);
        for seed in 0..5 {
            let m = leiden(&g, 1.0, seed, -1);
            let truth: Vec<u32> = (0..40).map(|i| (i / 5) as u32).collect();
            assert_eq!(adjusted_rand_score(&truth, &m), 1.0, "seed {seed}: {m:?}");
            assert_eq!(m, leiden(&g, 1.0, seed, -1), "deterministic");
        }
        // Very low resolution: one community (the modularity maximum at γ → 0).
        let m = leiden(&g, 0.01, 0, -1);
        assert!(m.iter().all(|&c| c == 0), "{m:?}");
    }

    #[test]
    fn is_at_a_local_optimum_and_communities_are_connected() {
        let mut rng = Rng::new(9, &[]);
        let n = 300;
        let mut e = Vec::new();
        for i in 0..n {
            for _ in 0..4 {
                let j = if rng.uniform() < 0.8 {
                    (i / 30) * 30 + rng.below(30) as usize
                } else {
                    rng.below(n as u64) as usize
                };
                if j != i {
                    e.push((i as u32, j as u32, 0.5 + rng.uniform()));
                }
            }
        }
        let g = Graph::from_edges(n, &e);
        for gamma in [0.5, 1.0, 2.0] {
            let m = leiden(&g, gamma, 1, -1);
            let q = modularity(&g, &m, gamma);
            // No single node move improves the quality.
            let k = m.iter().max().unwrap() + 1;
            for v in 0..n {
                for c in 0..=k {
                    let mut m2 = m.clone();
                    m2[v] = c;
                    assert!(
                        modularity(&g, &m2, gamma) <= q + 1e-12,
                        "γ {gamma}: move {v} → {c}"
                    );
                }
            }
            // Every community induces a connected subgraph.
            for c in 0..k {
                let keep: Vec<bool> = m.iter().map(|&x| x == c).collect();
                let comp = super::super::graph::connected_components(&g, &keep);
                assert!(
                    comp.iter().all(|&x| x == u32::MAX || x == 0),
                    "community {c} split"
                );
            }
        }
    }

    #[test]
    fn best_nmi_over_resolutions() {
        let g = ring_of_cliques(6, 4);
        let labels: Vec<u32> = (0..24).map(|i| (i / 4) as u32).collect();
        let grid = [0.01, 1.0, 3.0];
        let a = leiden_best_nmi(&g, &labels, &grid, 0, -1, 1).unwrap();
        assert_eq!(a.best.resolution, 1.0);
        assert_eq!(a.best.nmi, 1.0);
        assert_eq!(a.runs[0].n_clusters, 1);
        let b = leiden_best_nmi(&g, &labels, &grid, 0, -1, 3).unwrap();
        assert_eq!(a.membership, b.membership);
        assert_eq!(default_resolutions().len(), 20);
        assert_eq!(default_resolutions()[19], 2.0);
        assert!(leiden_best_nmi(&g, &labels, &[], 0, -1, 1).is_err());
    }
}
