//! k-means as scikit-learn 1.9's `KMeans(n_clusters=k, init="k-means++", n_init=10,
//! algorithm="lloyd", max_iter=300, tol=1e-4)` (the same algorithm, scfm's random draws).
//!
//! - Greedy k-means++: the first centre uniformly at random; each next centre is the best of
//!   `2 + ⌊ln k⌋` candidates drawn with probability proportional to the squared distance to
//!   the nearest chosen centre (the one that minimises the total of those distances).
//! - Lloyd iterations: assign every cell to its nearest centre (ties: lowest index), move
//!   each centre to the mean of its cells; a centre left without cells is moved onto the
//!   cell farthest from its own centre (scikit-learn's relocation). Stop when no assignment
//!   changes, or when the total squared centre shift is at most `tol` × the mean per-dimension
//!   variance (then assign once more with the final centres), or after `max_iter` iterations.
//! - `n_init` restarts with independent random streams; the lowest inertia (sum of squared
//!   distances to the assigned centres) wins.
//!
//! Distances use `f64` arithmetic on the `f32` embedding.

use super::distance::{Embedding, TQ, TR, dots, par_map, threads};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Parameters of [`kmeans`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KMeansOptions {
    /// Restarts; the lowest inertia is kept (scikit-learn: 10 in our use, "auto" → 1 or 10).
    pub n_init: usize,
    /// Maximum Lloyd iterations per restart.
    pub max_iter: usize,
    /// Relative tolerance on the centre shift (scikit-learn's `tol`).
    pub tol: f64,
    /// Threads (0: all cores); the result does not depend on it.
    pub threads: usize,
}

impl Default for KMeansOptions {
    fn default() -> Self {
        KMeansOptions {
            n_init: 10,
            max_iter: 300,
            tol: 1e-4,
            threads: 0,
        }
    }
}

/// Result of [`kmeans`].
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// Cluster (`0..k`) of every cell.
    pub labels: Vec<u32>,
    /// Centres, `k × d` row-major.
    pub centers: Vec<f64>,
    /// Sum of the squared distances of the cells to their centres.
    pub inertia: f64,
    /// Lloyd iterations of the kept restart.
    pub n_iter: usize,
}

/// Rows per work item.
const CHUNK: usize = 1536;

/// Cells and centres prepared for the kernel.
struct Ctx<'a> {
    emb: &'a Embedding<'a>,
    dp: usize,
    threads: usize,
}

impl Ctx<'_> {
    fn chunks(&self) -> usize {
        self.emb.n().div_ceil(CHUNK)
    }

    /// Rows `r` as `f64`, `dp` a row, zero rows up to a multiple of `TQ`.
    fn rows(&self, r: std::ops::Range<usize>) -> Vec<f64> {
        let (d, dp) = (self.emb.d(), self.dp);
        let mut out = vec![0.0; r.len().div_ceil(TQ) * TQ * dp];
        for (k, i) in r.enumerate() {
            for (o, &v) in out[k * dp..k * dp + d].iter_mut().zip(self.emb.row(i)) {
                *o = v as f64;
            }
        }
        out
    }

    /// Points `c` (`m × d`) as kernel references (`dp` a row, rows up to a multiple of `TR`),
    /// with their squared norms.
    fn refs(&self, c: &[f64], m: usize) -> (Vec<f64>, usize, Vec<f64>) {
        let (d, dp) = (self.emb.d(), self.dp);
        let mp = m.div_ceil(TR) * TR;
        let mut out = vec![0.0; mp * dp];
        let mut sq = Vec::with_capacity(m);
        for j in 0..m {
            let row = &c[j * d..(j + 1) * d];
            out[j * dp..j * dp + d].copy_from_slice(row);
            let mut acc = [0.0f64; 4];
            for (k, &v) in row.iter().enumerate() {
                acc[k % 4] = v.mul_add(v, acc[k % 4]);
            }
            sq.push((acc[0] + acc[1]) + (acc[2] + acc[3]));
        }
        (out, mp, sq)
    }

    /// Squared distances `|x_i|² - 2 x_i·c_j + |c_j|²` (clipped at 0) of every cell to each of
    /// the `m` points `c`, cell-major (`n × m`).
    fn sq_distances(&self, c: &[f64], m: usize, x_sq: &[f64]) -> Vec<f64> {
        let (r, mp, c_sq) = self.refs(c, m);
        let parts = par_map(self.chunks(), self.threads, |ch| {
            let range = ch * CHUNK..((ch + 1) * CHUNK).min(self.emb.n());
            let q = self.rows(range.clone());
            let nq = q.len() / self.dp;
            let mut out = vec![0.0; nq * mp];
            dots(&q, nq, &r, mp, self.dp, &mut out);
            let mut d = Vec::with_capacity(range.len() * m);
            for (k, i) in range.enumerate() {
                for j in 0..m {
                    d.push(((-2.0 * out[k * mp + j] + x_sq[i]) + c_sq[j]).max(0.0));
                }
            }
            d
        });
        parts.concat()
    }

    /// Nearest centre of every cell (ties: lowest index) with the per-chunk sums of the
    /// cells of each centre (`k × d`) and their counts.
    fn assign(&self, centers: &[f64], k: usize) -> (Vec<u32>, Vec<f64>, Vec<usize>) {
        let d = self.emb.d();
        let (r, kp, c_sq) = self.refs(centers, k);
        let parts = par_map(self.chunks(), self.threads, |ch| {
            let range = ch * CHUNK..((ch + 1) * CHUNK).min(self.emb.n());
            let q = self.rows(range.clone());
            let nq = q.len() / self.dp;
            let mut out = vec![0.0; nq * kp];
            dots(&q, nq, &r, kp, self.dp, &mut out);
            let mut labels = Vec::with_capacity(range.len());
            let mut sums = vec![0.0f64; k * d];
            let mut counts = vec![0usize; k];
            for (row, i) in range.enumerate() {
                let mut best = (f64::INFINITY, 0usize);
                for (j, &c) in c_sq.iter().enumerate() {
                    let v = c - 2.0 * out[row * kp + j];
                    if v < best.0 {
                        best = (v, j);
                    }
                }
                labels.push(best.1 as u32);
                counts[best.1] += 1;
                for (s, &x) in sums[best.1 * d..(best.1 + 1) * d]
                    .iter_mut()
                    .zip(self.emb.row(i))
                {
                    *s += x as f64;
                }
            }
            (labels, sums, counts)
        });
        let mut labels = Vec::with_capacity(self.emb.n());
        let mut sums = vec![0.0f64; k * d];
        let mut counts = vec![0usize; k];
        for (l, s, c) in parts {
            labels.extend(l);
            for (a, b) in sums.iter_mut().zip(&s) {
                *a += b;
            }
            for (a, b) in counts.iter_mut().zip(&c) {
                *a += b;
            }
        }
        (labels, sums, counts)
    }

    /// `|x_i - c_{labels_i}|²` of every cell.
    fn own_sq_distances(&self, centers: &[f64], labels: &[u32]) -> Vec<f64> {
        let d = self.emb.d();
        let parts = par_map(self.chunks(), self.threads, |ch| {
            (ch * CHUNK..((ch + 1) * CHUNK).min(self.emb.n()))
                .map(|i| {
                    let c = &centers[labels[i] as usize * d..(labels[i] as usize + 1) * d];
                    self.emb
                        .row(i)
                        .iter()
                        .zip(c)
                        .map(|(&x, &c)| (x as f64 - c).powi(2))
                        .sum::<f64>()
                })
                .collect::<Vec<f64>>()
        });
        parts.concat()
    }
}

/// Greedy k-means++ initial centres (`k × d`).
fn kmeans_plus_plus(ctx: &Ctx, k: usize, x_sq: &[f64], rng: &mut Rng) -> Vec<f64> {
    let (n, d) = (ctx.emb.n(), ctx.emb.d());
    let trials = 2 + (k as f64).ln() as usize;
    let row = |i: usize| {
        ctx.emb
            .row(i)
            .iter()
            .map(|&v| v as f64)
            .collect::<Vec<f64>>()
    };
    let mut centers = Vec::with_capacity(k * d);
    let first = rng.below(n as u64) as usize;
    centers.extend(row(first));
    let mut closest = ctx.sq_distances(&centers, 1, x_sq);
    let mut pot: f64 = closest.iter().sum();
    for _ in 1..k {
        let mut cum = Vec::with_capacity(n);
        let mut acc = 0.0;
        for &v in &closest {
            acc += v;
            cum.push(acc);
        }
        let candidates: Vec<usize> = (0..trials)
            .map(|_| {
                let v = rng.uniform() * pot;
                cum.partition_point(|&c| c < v).min(n - 1)
            })
            .collect();
        let cand: Vec<f64> = candidates.iter().flat_map(|&i| row(i)).collect();
        let dist = ctx.sq_distances(&cand, trials, x_sq);
        let mut best: Option<(f64, usize)> = None;
        for t in 0..trials {
            let p: f64 = (0..n).map(|i| closest[i].min(dist[i * trials + t])).sum();
            if best.is_none_or(|b| p < b.0) {
                best = Some((p, t));
            }
        }
        let (p, t) = best.expect("at least two trials");
        for (i, c) in closest.iter_mut().enumerate() {
            *c = c.min(dist[i * trials + t]);
        }
        pot = p;
        centers.extend(row(candidates[t]));
    }
    centers
}

/// One Lloyd run from `centers`; returns (labels, centres, inertia, iterations).
fn lloyd(ctx: &Ctx, mut centers: Vec<f64>, k: usize, opts: &KMeansOptions, tol: f64) -> KMeans {
    let (n, d) = (ctx.emb.n(), ctx.emb.d());
    let mut labels_old = vec![u32::MAX; n];
    let mut labels = Vec::new();
    let mut strict = false;
    let mut n_iter = 0;
    for _ in 0..opts.max_iter {
        n_iter += 1;
        let (l, mut sums, mut counts) = ctx.assign(&centers, k);
        labels = l;
        let empty: Vec<usize> = (0..k).filter(|&c| counts[c] == 0).collect();
        if !empty.is_empty() {
            let dist = ctx.own_sq_distances(&centers, &labels);
            let mut far: Vec<usize> = (0..n).collect();
            far.sort_by(|&a, &b| dist[b].total_cmp(&dist[a]).then(a.cmp(&b)));
            for (&e, &f) in empty.iter().zip(&far) {
                let old = labels[f] as usize;
                for (j, &x) in ctx.emb.row(f).iter().enumerate() {
                    sums[old * d + j] -= x as f64;
                    sums[e * d + j] = x as f64;
                }
                counts[old] -= 1;
                counts[e] = 1;
            }
        }
        let mut shift = 0.0;
        for c in 0..k {
            for j in 0..d {
                let new = if counts[c] > 0 {
                    sums[c * d + j] / counts[c] as f64
                } else {
                    centers[c * d + j]
                };
                shift += (new - centers[c * d + j]).powi(2);
                centers[c * d + j] = new;
            }
        }
        if labels == labels_old {
            strict = true;
            break;
        }
        if shift <= tol {
            break;
        }
        labels_old.clone_from(&labels);
    }
    if !strict {
        labels = ctx.assign(&centers, k).0;
    }
    let inertia = ctx.own_sq_distances(&centers, &labels).iter().sum();
    KMeans {
        labels,
        centers,
        inertia,
        n_iter,
    }
}

/// k-means of the rows of `emb` into `k` clusters (see the module documentation),
/// deterministic for a `seed`. Needs `1 <= k <= n`.
pub fn kmeans(emb: &Embedding, k: usize, seed: u64, opts: &KMeansOptions) -> Result<KMeans> {
    let (n, d) = (emb.n(), emb.d());
    if k == 0 || k > n {
        return Err(Error::eval(format!("k-means with k = {k} on {n} cells")));
    }
    if opts.n_init == 0 || opts.max_iter == 0 {
        return Err(Error::eval("k-means needs n_init >= 1 and max_iter >= 1"));
    }
    let ctx = Ctx {
        emb,
        dp: d.div_ceil(4) * 4,
        threads: threads(opts.threads),
    };
    let x_sq = emb.sq_norms();
    // tol × mean over dimensions of the (population) variance.
    let mut mean = vec![0.0f64; d];
    for i in 0..n {
        for (m, &x) in mean.iter_mut().zip(emb.row(i)) {
            *m += x as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut var = vec![0.0f64; d];
    for i in 0..n {
        for ((v, &x), m) in var.iter_mut().zip(emb.row(i)).zip(&mean) {
            *v += (x as f64 - m).powi(2);
        }
    }
    let tol = var.iter().map(|v| v / n as f64).sum::<f64>() / d as f64 * opts.tol;
    let mut best: Option<KMeans> = None;
    for init in 0..opts.n_init {
        let mut rng = Rng::new(seed, &[0x4B3EA5, init as u64]);
        let centers = kmeans_plus_plus(&ctx, k, &x_sq, &mut rng);
        let run = lloyd(&ctx, centers, k, opts, tol);
        if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
            best = Some(run);
        }
    }
    Ok(best.expect("n_init >= 1"))
}

#[cfg(test)]
mod tests {
    use super::super::scores::adjusted_rand_score;
    use super::*;

    #[test]
    fn hand_checked_line() {
        // Two obvious groups; centres are their means, inertia the squared deviations.
        let x = [0.0f32, 1.0, 2.0, 10.0, 11.0, 12.0];
        let emb = Embedding::new(&x, 6, 1).unwrap();
        let r = kmeans(&emb, 2, 0, &KMeansOptions::default()).unwrap();
        assert_eq!(adjusted_rand_score(&r.labels, &[0, 0, 0, 1, 1, 1]), 1.0);
        let mut c = r.centers.clone();
        c.sort_by(f64::total_cmp);
        assert_eq!(c, vec![1.0, 11.0]);
        assert_eq!(r.inertia, 4.0);
        let one = kmeans(&emb, 1, 0, &KMeansOptions::default()).unwrap();
        assert_eq!(one.centers, vec![6.0]);
        assert!(kmeans(&emb, 7, 0, &KMeansOptions::default()).is_err());
    }

    #[test]
    fn blobs_are_found_deterministically_whatever_the_threads() {
        let mut rng = Rng::new(2, &[]);
        let (n, d, k) = (3000, 7, 5);
        let centers: Vec<f64> = (0..k * d).map(|_| rng.normal() * 8.0).collect();
        let truth: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
        let x: Vec<f32> = (0..n)
            .flat_map(|i| {
                let c = truth[i] as usize;
                (0..d)
                    .map(|j| (centers[c * d + j] + rng.normal()) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let emb = Embedding::new(&x, n, d).unwrap();
        let mut o = KMeansOptions {
            threads: 1,
            ..Default::default()
        };
        let a = kmeans(&emb, k, 7, &o).unwrap();
        assert_eq!(adjusted_rand_score(&truth, &a.labels), 1.0);
        o.threads = 3;
        assert_eq!(a, kmeans(&emb, k, 7, &o).unwrap());
        // The inertia is that of the labels and centres.
        let direct: f64 = (0..n)
            .map(|i| {
                let c = a.labels[i] as usize;
                (0..d)
                    .map(|j| (x[i * d + j] as f64 - a.centers[c * d + j]).powi(2))
                    .sum::<f64>()
            })
            .sum();
        assert!((a.inertia - direct).abs() <= 1e-9 * direct);
    }

    #[test]
    fn empty_clusters_are_relocated() {
        // Centres 0, 100, 1000: the last gets no cell and takes the cell farthest from its
        // centre (1 and 101 tie at 1: the lower index, cell 2).
        let x = [0.0f32, 0.0, 1.0, 100.0, 101.0];
        let emb = Embedding::new(&x, 5, 1).unwrap();
        let ctx = Ctx {
            emb: &emb,
            dp: 4,
            threads: 1,
        };
        let r = lloyd(
            &ctx,
            vec![0.0, 100.0, 1000.0],
            3,
            &KMeansOptions::default(),
            0.0,
        );
        assert_eq!(r.labels, vec![0, 0, 2, 1, 1]);
        assert_eq!(r.centers, vec![0.0, 100.5, 1.0]);
        assert_eq!(r.inertia, 0.5);
        assert_eq!(r.n_iter, 2);
    }
}
