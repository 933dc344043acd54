//! Exact pairwise distances by blocked brute force.
//!
//! Every pairwise pass of the evaluation (nearest neighbours, silhouettes) goes through
//! [`scan`]: the rows are converted to `f64` one block at a time and the dot products of a
//! block of query rows with a block of reference rows are computed by a small register-tiled
//! kernel (AVX2 + FMA when the CPU has it, else a portable kernel with the *same* arithmetic:
//! fused multiply-adds into four lanes, reduced as `(l0 + l1) + (l2 + l3)`), so results do not
//! depend on the CPU, the number of threads or the block a row falls in. Distances follow
//! scikit-learn's formulas on `float64` input:
//!
//! - euclidean: `sqrt(max(-2 x·y + |x|² + |y|², 0))` (`sklearn.metrics.euclidean_distances`);
//! - cosine: `1 - x·y / (|x| |y|)` clipped to `[0, 2]`, a zero row having similarity 0
//!   (`sklearn.metrics.pairwise.cosine_distances`).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// A dense embedding: `n` rows (cells) of `d` values, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Embedding<'a> {
    data: &'a [f32],
    n: usize,
    d: usize,
}

impl<'a> Embedding<'a> {
    /// Wraps `data` (`n × d`, row-major); fails when the length does not match, when
    /// `n == 0` or `d == 0`, or when a value is not finite (naming the first such cell).
    pub fn new(data: &'a [f32], n: usize, d: usize) -> Result<Self> {
        if n == 0 || d == 0 {
            return Err(Error::eval(format!(
                "empty embedding ({n} cells × {d} dims)"
            )));
        }
        if n.checked_mul(d) != Some(data.len()) {
            return Err(Error::eval(format!(
                "embedding has {} values, expected {n} cells × {d} dims = {}",
                data.len(),
                n.saturating_mul(d)
            )));
        }
        if u32::try_from(n).is_err() {
            return Err(Error::eval(format!(
                "{n} cells: at most 2^32 - 1 supported"
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::eval(format!(
                "embedding value {} of cell {} (dim {}) is not finite",
                data[i],
                i / d,
                i % d
            )));
        }
        Ok(Embedding { data, n, d })
    }

    /// Number of rows (cells).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of dimensions.
    pub fn d(&self) -> usize {
        self.d
    }

    /// The values, row-major.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.d..(i + 1) * self.d]
    }

    /// Squared euclidean norm of every row, in `f64`.
    pub(crate) fn sq_norms(&self) -> Vec<f64> {
        (0..self.n)
            .map(|i| dot_f32(self.row(i), self.row(i)))
            .collect()
    }
}

/// A distance between embedding rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// `1 - cos(x, y)` (scikit-learn's `cosine`).
    #[default]
    Cosine,
    /// `|x - y|` (scikit-learn's `euclidean`).
    Euclidean,
}

/// `x·y` with the kernel's arithmetic (four fused lanes, reduced pairwise), in `f64`.
pub(crate) fn dot_f32(x: &[f32], y: &[f32]) -> f64 {
    let mut acc = [0.0f64; 4];
    for (k, (&a, &b)) in x.iter().zip(y).enumerate() {
        acc[k % 4] = (a as f64).mul_add(b as f64, acc[k % 4]);
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// The distance between two rows whose dot product and squared norms are given, as in
/// [`scan`] (see the module documentation for the formulas).
#[cfg(test)]
pub(crate) fn distance(metric: Metric, dot: f64, sq_x: f64, sq_y: f64) -> f64 {
    match metric {
        Metric::Euclidean => ((-2.0 * dot + sq_x) + sq_y).max(0.0).sqrt(),
        Metric::Cosine => (1.0 - dot * inv_norm(sq_x) * inv_norm(sq_y)).clamp(0.0, 2.0),
    }
}

/// `1 / sqrt(sq)`, or 0 for a zero row (whose cosine similarity to anything is 0).
#[inline]
fn inv_norm(sq: f64) -> f64 {
    let s = sq.sqrt();
    if s == 0.0 { 0.0 } else { 1.0 / s }
}

/// Per-row constants that turn dot products into distances (see [`to_distances`]).
#[derive(Debug, Clone)]
pub(crate) struct Norms {
    metric: Metric,
    /// Squared norms (euclidean) or inverse norms, 0 for a zero row (cosine).
    v: Vec<f64>,
}

impl Norms {
    /// The constants of `emb`'s rows, in the order `order` (or the natural order).
    pub(crate) fn new(emb: &Embedding, metric: Metric, order: Option<&[u32]>) -> Self {
        let sq = emb.sq_norms();
        let at = |i: usize| sq[order.map_or(i, |o| o[i] as usize)];
        let v = (0..emb.n())
            .map(|i| match metric {
                Metric::Euclidean => at(i),
                Metric::Cosine => inv_norm(at(i)),
            })
            .collect();
        Norms { metric, v }
    }
}

/// Turns `dots` (query `q` against references `r0..r0 + dots.len()`, in scan order) into
/// distances in place, exactly as [`distance`] does.
#[inline]
pub(crate) fn to_distances(norms: &Norms, q: usize, r0: usize, dots: &mut [f64]) {
    let nq = norms.v[q];
    let nr = &norms.v[r0..r0 + dots.len()];
    match norms.metric {
        Metric::Euclidean => {
            for (x, &n) in dots.iter_mut().zip(nr) {
                *x = ((-2.0 * *x + nq) + n).max(0.0).sqrt();
            }
        }
        Metric::Cosine => {
            for (x, &n) in dots.iter_mut().zip(nr) {
                *x = (1.0 - *x * nq * n).clamp(0.0, 2.0);
            }
        }
    }
}

/// Query rows per micro-tile.
pub(crate) const TQ: usize = 3;
/// Reference rows per micro-tile.
pub(crate) const TR: usize = 4;

/// Rows in scan order: scan row `i` is row `order[i]` of the embedding (or row `i`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub emb: Embedding<'a>,
    pub order: Option<&'a [u32]>,
}

impl Rows<'_> {
    fn source(&self, i: usize) -> &[f32] {
        self.emb.row(self.order.map_or(i, |o| o[i] as usize))
    }

    /// Copies scan rows `range` into `out` as `f64`, `dp` values a row (zero-padded), and
    /// zero rows up to a multiple of `mult` rows.
    fn load(&self, range: Range<usize>, dp: usize, mult: usize, out: &mut Vec<f64>) {
        let rows = range.len().div_ceil(mult) * mult;
        out.clear();
        out.resize(rows * dp, 0.0);
        for (k, i) in range.enumerate() {
            for (o, &v) in out[k * dp..].iter_mut().zip(self.source(i)) {
                *o = v as f64;
            }
        }
    }
}

/// Number of worker threads: `requested`, or the available parallelism when 0.
pub(crate) fn threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// `f(0), …, f(items - 1)` computed on up to `threads` threads (items handed out in order),
/// returned in item order.
pub(crate) fn par_map<T: Send>(
    items: usize,
    threads: usize,
    f: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    let t = threads.clamp(1, items.max(1));
    if t == 1 {
        return (0..items).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut all: Vec<(usize, T)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..t)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= items {
                            break out;
                        }
                        out.push((i, f(i)));
                    }
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("evaluation thread panicked"))
            .collect()
    });
    all.sort_by_key(|x| x.0);
    all.into_iter().map(|x| x.1).collect()
}

/// Block sizes: query rows and reference rows per block for `dp` padded dimensions.
fn block_sizes(dp: usize) -> (usize, usize) {
    let budget = 192 * 1024 / 8; // values per block buffer (~192 KiB)
    let qb = (budget / dp / TQ).clamp(1, 32) * TQ;
    let rb = (budget / dp / TR).clamp(1, 64) * TR;
    (qb, rb)
}

/// Visits every (query, reference) pair of `rows` once, a block of references at a time.
///
/// The query rows are split into blocks handed to `threads` threads; for each block,
/// `init(range)` makes a state and, for each block of references `r0..r0 + len` (in increasing
/// order) and each query `q` of the block, `visit(&mut state, q, r0, dots)` receives the dot
/// products of query `q` with those references (which it may overwrite). The states are
/// returned in block order. All indices are scan positions.
pub(crate) fn scan<S: Send>(
    rows: &Rows,
    threads: usize,
    init: impl Fn(Range<usize>) -> S + Sync,
    visit: impl Fn(&mut S, usize, usize, &mut [f64]) + Sync,
) -> Vec<S> {
    let (n, d) = (rows.emb.n(), rows.emb.d());
    let dp = d.div_ceil(4) * 4;
    let (qb, rb) = block_sizes(dp);
    let n_blocks = n.div_ceil(qb);
    let next = AtomicUsize::new(0);
    let work = || {
        let (mut qbuf, mut rbuf) = (Vec::new(), Vec::new());
        let mut out = vec![0.0f64; qb.div_ceil(TQ) * TQ * rb];
        let mut done = Vec::new();
        loop {
            let b = next.fetch_add(1, Ordering::Relaxed);
            if b >= n_blocks {
                break;
            }
            let qr = b * qb..((b + 1) * qb).min(n);
            let mut state = init(qr.clone());
            rows.load(qr.clone(), dp, TQ, &mut qbuf);
            let nq = qbuf.len() / dp;
            for r0 in (0..n).step_by(rb) {
                let r1 = (r0 + rb).min(n);
                rows.load(r0..r1, dp, TR, &mut rbuf);
                let nr = rbuf.len() / dp;
                dots(&qbuf, nq, &rbuf, nr, dp, &mut out[..nq * nr]);
                for (k, q) in qr.clone().enumerate() {
                    visit(&mut state, q, r0, &mut out[k * nr..k * nr + (r1 - r0)]);
                }
            }
            done.push((b, state));
        }
        done
    };
    let t = threads.clamp(1, n_blocks.max(1));
    let mut all: Vec<(usize, S)> = if t == 1 {
        work()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..t).map(|_| s.spawn(work)).collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("distance scan thread panicked"))
                .collect()
        })
    };
    all.sort_by_key(|(b, _)| *b);
    all.into_iter().map(|(_, s)| s).collect()
}

/// Dot products of the `nq` rows of `q` with the `nr` rows of `r` (both `dp` values a row;
/// `nq % TQ == 0`, `nr % TR == 0`, `dp % 4 == 0`) into `out` (`nq × nr`, row-major).
pub(crate) fn dots(q: &[f64], nq: usize, r: &[f64], nr: usize, dp: usize, out: &mut [f64]) {
    debug_assert!(nq.is_multiple_of(TQ) && nr.is_multiple_of(TR) && dp.is_multiple_of(4));
    debug_assert!(q.len() >= nq * dp && r.len() >= nr * dp && out.len() >= nq * nr);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA; the slice bounds are asserted inside.
        unsafe { dots_avx2(q, nq, r, nr, dp, out) };
        return;
    }
    dots_portable(q, nq, r, nr, dp, out);
}

/// The portable kernel: the same fused lanes and reduction as [`dots_avx2`].
fn dots_portable(q: &[f64], nq: usize, r: &[f64], nr: usize, dp: usize, out: &mut [f64]) {
    for i in 0..nq {
        let qi = &q[i * dp..(i + 1) * dp];
        for j in 0..nr {
            let rj = &r[j * dp..(j + 1) * dp];
            let mut acc = [0.0f64; 4];
            for (a, b) in qi.chunks_exact(4).zip(rj.chunks_exact(4)) {
                for l in 0..4 {
                    acc[l] = a[l].mul_add(b[l], acc[l]);
                }
            }
            out[i * nr + j] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(q: &[f64], nq: usize, r: &[f64], nr: usize, dp: usize, out: &mut [f64]) {
    use std::arch::x86_64::*;
    assert!(q.len() >= nq * dp && r.len() >= nr * dp && out.len() >= nq * nr);
    assert!(nq.is_multiple_of(TQ) && nr.is_multiple_of(TR) && dp.is_multiple_of(4));
    let (qp, rp, op) = (q.as_ptr(), r.as_ptr(), out.as_mut_ptr());
    for i in (0..nq).step_by(TQ) {
        for j in (0..nr).step_by(TR) {
            // SAFETY: rows i..i+TQ of q and j..j+TR of r hold dp values each (asserted above),
            // and every load reads 4 values at k < dp (dp % 4 == 0).
            unsafe {
                let mut acc = [[_mm256_setzero_pd(); TR]; TQ];
                let mut k = 0;
                while k < dp {
                    let rv = [
                        _mm256_loadu_pd(rp.add(j * dp + k)),
                        _mm256_loadu_pd(rp.add((j + 1) * dp + k)),
                        _mm256_loadu_pd(rp.add((j + 2) * dp + k)),
                        _mm256_loadu_pd(rp.add((j + 3) * dp + k)),
                    ];
                    for (a, acc_a) in acc.iter_mut().enumerate() {
                        let qv = _mm256_loadu_pd(qp.add((i + a) * dp + k));
                        for (b, acc_ab) in acc_a.iter_mut().enumerate() {
                            *acc_ab = _mm256_fmadd_pd(qv, rv[b], *acc_ab);
                        }
                    }
                    k += 4;
                }
                for (a, acc_a) in acc.iter().enumerate() {
                    // [a0+a1, b0+b1, a2+a3, b2+b3] and [c0+c1, d0+d1, c2+c3, d2+d3]
                    let h01 = _mm256_hadd_pd(acc_a[0], acc_a[1]);
                    let h23 = _mm256_hadd_pd(acc_a[2], acc_a[3]);
                    let lo = _mm256_permute2f128_pd::<0x20>(h01, h23);
                    let hi = _mm256_permute2f128_pd::<0x31>(h01, h23);
                    _mm256_storeu_pd(op.add((i + a) * nr + j), _mm256_add_pd(lo, hi));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed, &[]);
        (0..n * d).map(|_| r.normal() as f32).collect()
    }

    #[test]
    fn kernels_agree_bitwise_with_the_definition() {
        for (nq, nr, dp) in [(3, 4, 4), (6, 8, 52), (9, 12, 128), (3, 4, 516)] {
            let q: Vec<f64> = random(nq, dp, 1).iter().map(|&v| v as f64).collect();
            let r: Vec<f64> = random(nr, dp, 2).iter().map(|&v| v as f64).collect();
            let mut a = vec![0.0; nq * nr];
            let mut b = vec![0.0; nq * nr];
            dots(&q, nq, &r, nr, dp, &mut a);
            dots_portable(&q, nq, &r, nr, dp, &mut b);
            assert_eq!(a, b, "nq {nq} nr {nr} dp {dp}");
            for i in 0..nq {
                for j in 0..nr {
                    let x: Vec<f32> = q[i * dp..(i + 1) * dp].iter().map(|&v| v as f32).collect();
                    let y: Vec<f32> = r[j * dp..(j + 1) * dp].iter().map(|&v| v as f32).collect();
                    assert_eq!(a[i * nr + j], dot_f32(&x, &y));
                }
            }
        }
    }

    #[test]
    fn scan_visits_every_pair_once_in_any_thread_count() {
        let (n, d) = (203, 37);
        let data = random(n, d, 3);
        let emb = Embedding::new(&data, n, d).unwrap();
        let order: Vec<u32> = (0..n as u32).rev().collect();
        for order in [None, Some(&order[..])] {
            let rows = Rows { emb, order };
            let run = |t| {
                scan(
                    &rows,
                    t,
                    |r: Range<usize>| (r.start, vec![0.0f64; r.len() * n]),
                    |(s, m): &mut (usize, Vec<f64>), q, r0, dots: &mut [f64]| {
                        for (j, &v) in dots.iter().enumerate() {
                            assert_eq!(m[(q - *s) * n + r0 + j], 0.0, "visited twice");
                            m[(q - *s) * n + r0 + j] = v + 1e-300;
                        }
                    },
                )
                .into_iter()
                .flat_map(|(_, m)| m)
                .collect::<Vec<f64>>()
            };
            let one = run(1);
            assert_eq!(one, run(3));
            let src = |i: usize| order.map_or(i, |o| o[i] as usize);
            for i in 0..n {
                for j in 0..n {
                    let want = dot_f32(emb.row(src(i)), emb.row(src(j)));
                    assert_eq!(one[i * n + j], want + 1e-300);
                }
            }
        }
    }

    #[test]
    fn distances_follow_sklearn_formulas() {
        let e = Embedding::new(&[3.0, 4.0, 0.0, 0.0, 6.0, 8.0, -3.0, -4.0], 4, 2).unwrap();
        let sq = e.sq_norms();
        let d = |m, i: usize, j: usize| distance(m, dot_f32(e.row(i), e.row(j)), sq[i], sq[j]);
        assert_eq!(d(Metric::Euclidean, 0, 2), 5.0);
        assert_eq!(d(Metric::Euclidean, 0, 1), 5.0);
        assert_eq!(d(Metric::Cosine, 0, 2), 0.0);
        assert_eq!(d(Metric::Cosine, 0, 3), 2.0);
        assert_eq!(d(Metric::Cosine, 0, 1), 1.0, "zero row: similarity 0");
        for m in [Metric::Euclidean, Metric::Cosine] {
            let norms = Norms::new(&e, m, None);
            let mut row: Vec<f64> = (0..4).map(|j| dot_f32(e.row(0), e.row(j))).collect();
            to_distances(&norms, 0, 0, &mut row);
            for (j, &v) in row.iter().enumerate() {
                assert_eq!(v, d(m, 0, j), "{m:?} {j}");
            }
        }
    }

    #[test]
    fn bad_embeddings_are_named() {
        let e = Embedding::new(&[1.0, 2.0, 3.0], 2, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("3 values") && e.contains("2 cells × 2 dims"),
            "{e}"
        );
        let e = Embedding::new(&[1.0, f32::NAN], 1, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cell 0 (dim 1)"), "{e}");
        assert!(Embedding::new(&[], 0, 3).is_err());
    }
}
