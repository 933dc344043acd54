//! One-predictor loess (Cleveland, Grosse & Shyu's `dloess`, the code behind R's `loess`
//! and scikit-misc's `skmisc.loess.loess`, which scanpy's `seurat_v3` flavor calls) with
//! the settings scanpy uses: local quadratic fits (`degree=2`), tricube weights over the
//! `floor(n * span + 1e-5)` nearest points, gaussian family (no robustness iterations).
//!
//! [`Surface::Interpolate`] (skmisc's default, so scanpy's) fits exactly at the vertices
//! of a k-d tree and interpolates between them with cubic Hermite polynomials using the
//! fitted value and slope at each vertex; the tree is built as `dloess` builds it (cells
//! of at most `floor(n * span * 0.2)` points, split at the median with ties kept
//! together). [`Surface::Direct`] fits at every point. Each local fit is a weighted least
//! squares solved, as in `dloess`, on equilibrated columns by QR and an SVD whose
//! singular values below `100 * eps * max` are dropped (a pseudo-inverse). The results
//! agree with scikit-misc 0.5 to about 1e-13 (rounding only).

use crate::error::{Error, Result};

/// Where the loess surface is computed exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Surface {
    /// Fit at k-d tree vertices and interpolate (R/skmisc `surface="interpolate"`).
    #[default]
    Interpolate,
    /// Fit at every point (`surface="direct"`); slower, no interpolation error.
    Direct,
}

/// skmisc/R `loess.control(cell=0.2)`: a k-d tree cell holds at most `n * span * cell` points.
const CELL: f64 = 0.2;
/// Local polynomial terms for degree 2 in one dimension: 1, dx, dx².
const K: usize = 3;

fn bad(message: String) -> Error {
    Error::config("loess", message)
}

/// Loess fitted values at `x` for the data `(x, y)` with smoothing `span` (fraction of
/// points in each local fit, e.g. scanpy's `0.3`).
///
/// Errors (naming `loess` or `span`) on mismatched lengths, non-finite data, a span that
/// leaves fewer than 4 points per fit, or a neighbourhood of zero width (more than
/// `span * n` points share one x).
pub fn loess(x: &[f64], y: &[f64], span: f64, surface: Surface) -> Result<Vec<f64>> {
    if x.len() != y.len() {
        return Err(bad(format!(
            "{} x values but {} y values",
            x.len(),
            y.len()
        )));
    }
    if let Some(i) = (0..x.len()).find(|&i| !x[i].is_finite() || !y[i].is_finite()) {
        return Err(bad(format!(
            "point {i} is not finite: ({}, {})",
            x[i], y[i]
        )));
    }
    let n = x.len();
    if !(span.is_finite() && span > 0.0) {
        return Err(Error::config(
            "span",
            format!("{span} is not a positive number"),
        ));
    }
    let nf = n.min((n as f64 * span + 1e-5).floor() as usize);
    if nf < K + 1 {
        return Err(Error::config(
            "span",
            format!("span {span} of {n} points leaves {nf} per local fit; at least 4 are needed"),
        ));
    }
    let mut local = LocalFit {
        x,
        y,
        nf,
        span,
        dist: vec![0.0; n],
        order: (0..n).collect(),
    };
    match surface {
        Surface::Direct => x.iter().map(|&q| Ok(local.at(q)?[0])).collect(),
        Surface::Interpolate => {
            let mut sorted = x.to_vec();
            sorted.sort_unstable_by(f64::total_cmp);
            let fc = (n as f64 * (span * CELL)).floor() as usize;
            let tree = KdTree::build(&sorted, fc, n.max(200));
            let vval = tree
                .vertices
                .iter()
                .map(|&q| local.at(q))
                .collect::<Result<Vec<_>>>()?;
            Ok(x.iter().map(|&z| tree.eval(z, &vval)).collect())
        }
    }
}

/// The local quadratic fit of `dloess`'s `ehg127`.
struct LocalFit<'a> {
    x: &'a [f64],
    y: &'a [f64],
    nf: usize,
    span: f64,
    dist: Vec<f64>,
    order: Vec<usize>,
}

impl LocalFit<'_> {
    /// Value and slope at `q` of the tricube-weighted quadratic fit to the `nf` nearest points.
    fn at(&mut self, q: f64) -> Result<[f64; 2]> {
        for (d, &xi) in self.dist.iter_mut().zip(self.x) {
            *d = (xi - q) * (xi - q);
        }
        let (dist, nf) = (&self.dist, self.nf);
        self.order
            .select_nth_unstable_by(nf - 1, |&a, &b| dist[a].total_cmp(&dist[b]));
        // Squared distance of the nf-th nearest point (the radius, squared).
        let rho = dist[self.order[nf - 1]] * self.span.max(1.0);
        if rho <= 0.0 {
            return Err(bad(format!(
                "zero-width neighbourhood at x = {q}: more than {nf} points share that x; \
                 make span bigger"
            )));
        }
        let rows = &mut self.order[..nf];
        rows.sort_unstable();
        let mut b = Vec::with_capacity(nf);
        let mut eta = Vec::with_capacity(nf);
        for &j in rows.iter() {
            let r = (dist[j] / rho).sqrt();
            let w = ((1.0 - r * r * r).powi(3)).sqrt();
            let dx = self.x[j] - q;
            b.push([w, w * dx, w * dx * dx]);
            eta.push(w * self.y[j]);
        }
        if b.iter().all(|r| r[0] == 0.0) {
            return Err(bad(format!(
                "all points on the boundary of the neighbourhood at x = {q}; make span bigger"
            )));
        }
        // Equilibrate columns.
        let mut colnorm = [1.0; K];
        for (j, cn) in colnorm.iter_mut().enumerate() {
            let s = b.iter().map(|r| r[j] * r[j]).sum::<f64>().sqrt();
            if s > 0.0 {
                b.iter_mut().for_each(|r| r[j] /= s);
                *cn = s;
            }
        }
        let (r, c) = householder_qr(&mut b, &mut eta);
        let beta = svd_solve(r, c);
        Ok([beta[0] / colnorm[0], beta[1] / colnorm[1]])
    }
}

/// Householder QR of `b` (rows × 3) applied to `eta`; returns R and the first 3 of Qᵀ·eta.
fn householder_qr(b: &mut [[f64; K]], eta: &mut [f64]) -> ([[f64; K]; K], [f64; K]) {
    for j in 0..K {
        let norm = b[j..].iter().map(|r| r[j] * r[j]).sum::<f64>().sqrt();
        if norm == 0.0 {
            continue;
        }
        let alpha = if b[j][j] > 0.0 { -norm } else { norm };
        let v0 = b[j][j] - alpha;
        let vnorm2 = v0 * v0 + b[j + 1..].iter().map(|r| r[j] * r[j]).sum::<f64>();
        for k in j + 1..K {
            let s = v0 * b[j][k] + b[j + 1..].iter().map(|r| r[j] * r[k]).sum::<f64>();
            let f = 2.0 * s / vnorm2;
            b[j][k] -= f * v0;
            for r in b[j + 1..].iter_mut() {
                r[k] -= f * r[j];
            }
        }
        let s = v0 * eta[j]
            + b[j + 1..]
                .iter()
                .zip(&eta[j + 1..])
                .map(|(r, e)| r[j] * e)
                .sum::<f64>();
        let f = 2.0 * s / vnorm2;
        eta[j] -= f * v0;
        for (r, e) in b[j + 1..].iter().zip(eta[j + 1..].iter_mut()) {
            *e -= f * r[j];
        }
        b[j][j] = alpha;
    }
    let mut r = [[0.0; K]; K];
    for i in 0..K {
        r[i][i..].copy_from_slice(&b[i][i..]);
    }
    (r, [eta[0], eta[1], eta[2]])
}

/// Minimum-norm solution of `r · β = c` through the SVD of `r` (one-sided Jacobi), dropping
/// singular values `<= 100 * eps * max` as `dloess` does.
fn svd_solve(r: [[f64; K]; K], c: [f64; K]) -> [f64; K] {
    // Columns of A = R are rotated until orthogonal: A V = U Σ.
    let mut a = r;
    let mut v = [[0.0; K]; K];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    let col_dot =
        |m: &[[f64; K]; K], p: usize, q: usize| (0..K).map(|i| m[i][p] * m[i][q]).sum::<f64>();
    for _sweep in 0..100 {
        let mut rotated = false;
        for p in 0..K {
            for q in p + 1..K {
                let (alpha, beta, gamma) =
                    (col_dot(&a, p, p), col_dot(&a, q, q), col_dot(&a, p, q));
                if gamma == 0.0 || gamma.abs() <= f64::EPSILON * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let cs = 1.0 / (1.0 + t * t).sqrt();
                let sn = cs * t;
                for m in [&mut a, &mut v] {
                    for row in m.iter_mut() {
                        let (xp, xq) = (row[p], row[q]);
                        row[p] = cs * xp - sn * xq;
                        row[q] = sn * xp + cs * xq;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let sigma2: Vec<f64> = (0..K).map(|j| col_dot(&a, j, j)).collect();
    let smax = sigma2.iter().fold(0.0f64, |m, &s| m.max(s.sqrt()));
    let tol = smax * 100.0 * f64::EPSILON;
    let mut beta = [0.0; K];
    for j in 0..K {
        if sigma2[j].sqrt() > tol {
            // γ_j = u_jᵀc / σ_j with u_j = a_j / σ_j.
            let g = (0..K).map(|i| a[i][j] * c[i]).sum::<f64>() / sigma2[j];
            for (bi, vrow) in beta.iter_mut().zip(&v) {
                *bi += vrow[j] * g;
            }
        }
    }
    beta
}

/// A cell of the k-d tree: the sorted points `lo..=hi`, between vertices `v0 < v1`.
struct Cell {
    lo: usize,
    hi: usize,
    v0: usize,
    v1: usize,
    /// Split value and the two children (`z <= xi` goes to the first).
    split: Option<(f64, usize, usize)>,
}

/// `dloess`'s k-d tree in one dimension (`ehg126`, `ehg124`, `ehg125`) and its
/// cubic Hermite evaluation (`ehg128`).
struct KdTree {
    cells: Vec<Cell>,
    vertices: Vec<f64>,
}

impl KdTree {
    /// Builds the tree over sorted `s`; `fc` is the largest leaf, `nvmax` bounds the
    /// numbers of vertices and cells.
    fn build(s: &[f64], fc: usize, nvmax: usize) -> Self {
        let n = s.len();
        let (mn, mx) = (s[0], s[n - 1]);
        let mu = 0.005 * (mx - mn).max(1e-10 * mn.abs().max(mx.abs()) + 1e-30);
        let mut t = KdTree {
            cells: vec![Cell {
                lo: 0,
                hi: n - 1,
                v0: 0,
                v1: 1,
                split: None,
            }],
            vertices: vec![mn - mu, mx + mu],
        };
        let mut p = 0;
        while p < t.cells.len() {
            let (l, u) = (t.cells[p].lo, t.cells[p].hi);
            let (v0, v1) = (t.vertices[t.cells[p].v0], t.vertices[t.cells[p].v1]);
            let mut leaf = u - l < fc
                || v1 - v0 <= 0.0
                || nvmax < t.cells.len() + 2
                || (nvmax as f64) < t.vertices.len() as f64 + 1.0;
            let mut m = (l + u) / 2;
            if !leaf {
                // Split between unequal neighbours nearest the median: m, m+1, m-1, m+2, ...
                let mut off: isize = 0;
                loop {
                    let mo = m as isize + off;
                    if mo >= u as isize || mo < l as isize {
                        break;
                    }
                    let mo = mo as usize;
                    if s[mo] == s[mo + 1] {
                        off = -off;
                        if off >= 0 {
                            off += 1;
                        }
                    } else {
                        m = mo;
                        break;
                    }
                }
                leaf = v0 == s[m] || v1 == s[m];
            }
            if !leaf {
                let xi = s[m];
                let vi = match t.vertices.iter().position(|&v| v == xi) {
                    Some(i) => i,
                    None => {
                        t.vertices.push(xi);
                        t.vertices.len() - 1
                    }
                };
                let (a, b) = (t.cells.len(), t.cells.len() + 1);
                let (cv0, cv1) = (t.cells[p].v0, t.cells[p].v1);
                t.cells[p].split = Some((xi, a, b));
                t.cells.push(Cell {
                    lo: l,
                    hi: m,
                    v0: cv0,
                    v1: vi,
                    split: None,
                });
                t.cells.push(Cell {
                    lo: m + 1,
                    hi: u,
                    v0: vi,
                    v1: cv1,
                    split: None,
                });
            }
            p += 1;
        }
        t
    }

    /// The surface at `z` from the value and slope `vval` at each vertex.
    fn eval(&self, z: f64, vval: &[[f64; 2]]) -> f64 {
        let mut c = &self.cells[0];
        while let Some((xi, a, b)) = c.split {
            c = &self.cells[if z <= xi { a } else { b }];
        }
        let (x0, x1) = (self.vertices[c.v0], self.vertices[c.v1]);
        let (g0, g1) = (vval[c.v0], vval[c.v1]);
        let h = (z - x0) / (x1 - x0);
        let phi0 = (1.0 - h) * (1.0 - h) * (1.0 + 2.0 * h);
        let phi1 = h * h * (3.0 - 2.0 * h);
        let psi0 = h * (1.0 - h) * (1.0 - h);
        let psi1 = h * h * (h - 1.0);
        phi0 * g0[0] + phi1 * g1[0] + (psi0 * g0[1] + psi1 * g1[1]) * (x1 - x0)
    }
}
