//! Highly variable genes as scanpy 1.11's `highly_variable_genes` without `batch_key`:
//! `flavor="seurat_v3"` on counts ([`seurat_v3`]) and `flavor="seurat"` on log-normalised
//! data ([`seurat`]).
//!
//! Per-gene means and variances are float64 sums of the float32 values (squares taken in
//! float32, as scanpy's numba kernel does), `var = (Σx²/n − mean²) · n/(n−1)`.

use super::CsrMatrix;
use super::loess::{Surface, loess};
use crate::error::{Error, Result};

/// Result of [`seurat_v3`]; vectors have one entry per gene.
#[derive(Debug, Clone, PartialEq)]
pub struct SeuratV3 {
    /// Mean count (`means`).
    pub means: Vec<f64>,
    /// Unbiased variance of the counts (`variances`).
    pub variances: Vec<f64>,
    /// Variance after standardising with the loess-regularised standard deviation and
    /// clipping at `sqrt(n_cells)` (`variances_norm`); the ranking score.
    pub variances_norm: Vec<f64>,
    /// `Some(rank)` (0 = most variable) for the selected genes (`highly_variable_rank`).
    pub rank: Vec<Option<usize>>,
    /// Whether the gene is among the `n_top_genes` (`highly_variable`).
    pub highly_variable: Vec<bool>,
    /// The selected genes' indices, most variable first.
    pub selected: Vec<usize>,
}

/// Result of [`seurat`]; vectors have one entry per gene.
#[derive(Debug, Clone, PartialEq)]
pub struct Seurat {
    /// `log1p` of the mean of `expm1(x)` (`means`).
    pub means: Vec<f64>,
    /// `ln(variance / mean)` of `expm1(x)`; NaN for genes without variance (`dispersions`).
    pub dispersions: Vec<f64>,
    /// Dispersion standardised within its mean bin (`dispersions_norm`); NaN where undefined.
    pub dispersions_norm: Vec<f64>,
    /// Whether the gene is highly variable (`highly_variable`).
    pub highly_variable: Vec<bool>,
    /// The highly variable genes' indices, by decreasing normalised dispersion (ties by index).
    pub selected: Vec<usize>,
}

/// Parameters of [`seurat`]; `Default` is scanpy's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SeuratParams {
    /// Select this many genes by normalised dispersion (genes tied with the last one are
    /// all kept, as scanpy does); when set, the four cutoffs are ignored.
    pub n_top_genes: Option<usize>,
    /// Keep genes with `means > min_mean` (default 0.0125).
    pub min_mean: f64,
    /// Keep genes with `means < max_mean` (default 3).
    pub max_mean: f64,
    /// Keep genes with `dispersions_norm > min_disp` (default 0.5; NaN counts as 0).
    pub min_disp: f64,
    /// Keep genes with `dispersions_norm < max_disp` (default ∞).
    pub max_disp: f64,
    /// Number of equal-width bins of `means` (default 20).
    pub n_bins: usize,
}

impl Default for SeuratParams {
    fn default() -> Self {
        SeuratParams {
            n_top_genes: None,
            min_mean: 0.0125,
            max_mean: 3.0,
            min_disp: 0.5,
            max_disp: f64::INFINITY,
            n_bins: 20,
        }
    }
}

impl SeuratV3 {
    /// The names of the selected genes (most variable first) given the matrix's gene names.
    pub fn selected_names(&self, var_names: &[String]) -> Vec<String> {
        self.selected
            .iter()
            .map(|&g| var_names[g].clone())
            .collect()
    }
}

impl Seurat {
    /// The names of the selected genes (by decreasing normalised dispersion).
    pub fn selected_names(&self, var_names: &[String]) -> Vec<String> {
        self.selected
            .iter()
            .map(|&g| var_names[g].clone())
            .collect()
    }
}

/// Errors unless `x` has at least two cells (variances need them).
fn check_cells(x: &CsrMatrix) -> Result<()> {
    if x.n_rows < 2 {
        return Err(Error::config(
            "highly_variable_genes",
            format!("needs at least 2 cells, the matrix has {}", x.n_rows),
        ));
    }
    Ok(())
}

/// Per-gene float64 means and unbiased variances of `x`'s values mapped through `f`.
fn mean_var(x: &CsrMatrix, f: impl Fn(f32) -> f32) -> (Vec<f64>, Vec<f64>) {
    let g = x.n_cols;
    let (mut sum, mut sq) = (vec![0f64; g], vec![0f64; g]);
    for (&c, &v) in x.indices.iter().zip(&x.data) {
        let v = f(v);
        sum[c as usize] += f64::from(v);
        sq[c as usize] += f64::from(v * v);
    }
    let n = x.n_rows as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let var = sq
        .iter()
        .zip(&mean)
        .map(|(s, m)| {
            let v = s / n - m * m;
            if x.n_rows != 1 {
                v * (n / (n - 1.0))
            } else {
                v
            }
        })
        .collect();
    (mean, var)
}

/// Indices `0..len` ordered by decreasing `score`, ties by index, NaN last.
fn order_desc(score: &[f64]) -> Vec<usize> {
    let mut o: Vec<usize> = (0..score.len()).collect();
    o.sort_by(|&a, &b| match (score[a].is_nan(), score[b].is_nan()) {
        (false, false) => score[b].total_cmp(&score[a]),
        (na, nb) => na.cmp(&nb),
    });
    o
}

/// `flavor="seurat_v3"` (Seurat's `vst`) on raw counts: the `n_top_genes` genes with the
/// largest `variances_norm`, using a loess of log10 variance on log10 mean with `span`
/// (scanpy's default 0.3) fitted as scikit-misc does ([`Surface::Interpolate`]).
///
/// Genes tied on `variances_norm` at the cut are taken by increasing index; scanpy takes
/// them in numpy's unstable `argsort` order, which depends on the CPU, so a selection may
/// differ from scanpy's only among genes with exactly equal scores at the cut.
/// Errors (naming `n_top_genes`/`span`) if `n_top_genes` is 0, there are fewer than 2
/// cells, no gene varies, or the span is too small for the number of varying genes.
pub fn seurat_v3(x: &CsrMatrix, n_top_genes: usize, span: f64) -> Result<SeuratV3> {
    if n_top_genes == 0 {
        return Err(Error::config("n_top_genes", "must be at least 1"));
    }
    check_cells(x)?;
    if x.data.iter().any(|v| v.fract() != 0.0) {
        tracing::warn!("seurat_v3 expects raw counts, but non-integers were found");
    }
    let mut s = SeuratV3Stream::new(x.n_cols);
    s.add_moments(x);
    s.fit(span)?;
    s.add_clipped(x);
    s.finish(n_top_genes)
}

/// [`seurat_v3`] over cells that arrive in blocks (for datasets that do not fit in
/// memory): every block through [`SeuratV3Stream::add_moments`], then
/// [`SeuratV3Stream::fit`], then every block again through
/// [`SeuratV3Stream::add_clipped`], then [`SeuratV3Stream::finish`]. Blocks fed in the
/// order of the rows give exactly [`seurat_v3`]'s result on their concatenation.
#[derive(Debug, Clone)]
pub struct SeuratV3Stream {
    n_cells: usize,
    sum: Vec<f64>,
    sq: Vec<f64>,
    means: Vec<f64>,
    variances: Vec<f64>,
    reg_std: Vec<f64>,
    clip: Vec<f64>,
}

impl SeuratV3Stream {
    /// An empty accumulator for `n_genes` genes.
    pub fn new(n_genes: usize) -> Self {
        SeuratV3Stream {
            n_cells: 0,
            sum: vec![0.0; n_genes],
            sq: vec![0.0; n_genes],
            means: Vec::new(),
            variances: Vec::new(),
            reg_std: Vec::new(),
            clip: Vec::new(),
        }
    }

    /// First pass: adds a block's counts to the per-gene sums (squares in float32, as
    /// scanpy's kernel).
    ///
    /// # Panics
    ///
    /// If the block's width differs from `n_genes`.
    pub fn add_moments(&mut self, x: &CsrMatrix) {
        assert_eq!(x.n_cols, self.sum.len(), "block width differs");
        for (&c, &v) in x.indices.iter().zip(&x.data) {
            self.sum[c as usize] += f64::from(v);
            self.sq[c as usize] += f64::from(v * v);
        }
        self.n_cells += x.n_rows;
    }

    /// Between the passes: means, variances and the loess-regularised standard deviation
    /// of every gene. Errors (naming `n_top_genes`/`span`) on fewer than 2 cells, when no
    /// gene varies, or when the span is too small for the number of varying genes.
    pub fn fit(&mut self, span: f64) -> Result<()> {
        if self.n_cells < 2 {
            return Err(Error::config(
                "highly_variable_genes",
                format!("needs at least 2 cells, the matrix has {}", self.n_cells),
            ));
        }
        let n = self.n_cells as f64;
        self.means = self.sum.iter().map(|s| s / n).collect();
        self.variances = self
            .sq
            .iter()
            .zip(&self.means)
            .map(|(s, m)| (s / n - m * m) * (n / (n - 1.0)))
            .collect();
        let g = self.sum.len();
        let varying: Vec<usize> = (0..g).filter(|&i| self.variances[i] > 0.0).collect();
        if varying.is_empty() {
            return Err(Error::config(
                "n_top_genes",
                format!(
                    "none of the {g} genes varies across the {} cells",
                    self.n_cells
                ),
            ));
        }
        let lx: Vec<f64> = varying.iter().map(|&i| self.means[i].log10()).collect();
        let ly: Vec<f64> = varying.iter().map(|&i| self.variances[i].log10()).collect();
        let fitted = loess(&lx, &ly, span, Surface::Interpolate)?;
        let mut estimated = vec![0.0; g];
        for (&i, &f) in varying.iter().zip(&fitted) {
            estimated[i] = f;
        }
        self.reg_std = estimated.iter().map(|&e| 10f64.powf(e).sqrt()).collect();
        self.clip = self
            .reg_std
            .iter()
            .zip(&self.means)
            .map(|(s, m)| s * n.sqrt() + m)
            .collect();
        // The second pass sums the clipped values into the same buffers.
        self.sum.iter_mut().for_each(|v| *v = 0.0);
        self.sq.iter_mut().for_each(|v| *v = 0.0);
        Ok(())
    }

    /// Second pass (after [`SeuratV3Stream::fit`]): adds a block's clipped counts.
    ///
    /// # Panics
    ///
    /// If called before `fit` or with a block of another width.
    pub fn add_clipped(&mut self, x: &CsrMatrix) {
        assert!(!self.clip.is_empty(), "add_clipped before fit");
        assert_eq!(x.n_cols, self.sum.len(), "block width differs");
        for (&c, &v) in x.indices.iter().zip(&x.data) {
            let c = c as usize;
            let e = f64::from(v).min(self.clip[c]);
            self.sq[c] += e * e;
            self.sum[c] += e;
        }
    }

    /// The result: `variances_norm` and the `n_top_genes` most variable genes (ties at the
    /// cut by increasing index).
    pub fn finish(self, n_top_genes: usize) -> Result<SeuratV3> {
        if n_top_genes == 0 {
            return Err(Error::config("n_top_genes", "must be at least 1"));
        }
        let n = self.n_cells as f64;
        let g = self.sum.len();
        let variances_norm: Vec<f64> = (0..g)
            .map(|i| {
                let m = self.means[i];
                let r = self.reg_std[i];
                (1.0 / ((n - 1.0) * (r * r))) * ((n * (m * m)) + self.sq[i] - 2.0 * self.sum[i] * m)
            })
            .collect();
        let selected: Vec<usize> = order_desc(&variances_norm)
            .into_iter()
            .take(n_top_genes)
            .collect();
        let mut rank = vec![None; g];
        let mut highly_variable = vec![false; g];
        for (r, &i) in selected.iter().enumerate() {
            rank[i] = Some(r);
            highly_variable[i] = true;
        }
        Ok(SeuratV3 {
            means: self.means,
            variances: self.variances,
            variances_norm,
            rank,
            highly_variable,
            selected,
        })
    }
}

/// pandas' `cut(values, n_bins)` codes: equal-width bins over `[min, max]`, right-closed,
/// the lowest edge lowered by 0.1% of the range.
fn mean_bins(values: &[f64], n_bins: usize) -> Vec<usize> {
    let (mut mn, mut mx) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let mut edges: Vec<f64>;
    if mn == mx {
        mn -= if mn != 0.0 { 0.001 * mn.abs() } else { 0.001 };
        mx += if mx != 0.0 { 0.001 * mx.abs() } else { 0.001 };
        let step = (mx - mn) / n_bins as f64;
        edges = (0..=n_bins).map(|i| i as f64 * step + mn).collect();
        edges[n_bins] = mx;
    } else {
        let step = (mx - mn) / n_bins as f64;
        edges = (0..=n_bins).map(|i| i as f64 * step + mn).collect();
        edges[n_bins] = mx;
        edges[0] -= (mx - mn) * 0.001;
    }
    // searchsorted(side="left") - 1: the bin (edges[b], edges[b+1]] holding v.
    values
        .iter()
        .map(|&v| {
            edges
                .partition_point(|&e| e < v)
                .saturating_sub(1)
                .min(n_bins - 1)
        })
        .collect()
}

/// `flavor="seurat"` on log-normalised data (natural log, as `sc.pp.log1p` writes it).
///
/// Means and dispersions are of `expm1(x)`; each gene's log dispersion is standardised
/// by the mean and standard deviation (pandas' compensated mean and Welford variance,
/// NaNs skipped) of its mean bin; a bin with one gene gives it 1. With `n_top_genes`,
/// every gene whose normalised dispersion is at least the `n_top_genes`-th largest is
/// selected; otherwise the cutoffs of `params` apply. Errors (naming the parameter) on
/// `n_bins == 0`, `n_top_genes == Some(0)`, fewer than 2 cells, or when no gene has a
/// dispersion.
pub fn seurat(x: &CsrMatrix, params: &SeuratParams) -> Result<Seurat> {
    if params.n_bins == 0 {
        return Err(Error::config("n_bins", "must be at least 1"));
    }
    if params.n_top_genes == Some(0) {
        return Err(Error::config("n_top_genes", "must be at least 1"));
    }
    check_cells(x)?;
    let (mut means, var) = mean_var(x, f32::exp_m1);
    let mut dispersions = Vec::with_capacity(x.n_cols);
    for (m, v) in means.iter_mut().zip(&var) {
        if *m == 0.0 {
            *m = 1e-12;
        }
        let d = v / *m;
        dispersions.push(if d == 0.0 { f64::NAN } else { d.ln() });
        *m = m.ln_1p();
    }
    let bins = mean_bins(&means, params.n_bins);
    // Per bin: count, Kahan sum and compensation (pandas' group mean), Welford mean and M2.
    let mut st = vec![(0usize, 0f64, 0f64, 0f64, 0f64); params.n_bins];
    for (&b, &d) in bins.iter().zip(&dispersions) {
        if d.is_nan() {
            continue;
        }
        let (cnt, sum, comp, wmean, m2) = &mut st[b];
        *cnt += 1;
        let y = d - *comp;
        let t = *sum + y;
        *comp = t - *sum - y;
        *sum = t;
        let old = *wmean;
        *wmean += (d - old) / *cnt as f64;
        *m2 += (d - *wmean) * (d - old);
    }
    let norm_stats: Vec<(f64, f64)> = st
        .iter()
        .map(|&(cnt, sum, _, _, m2)| {
            let avg = if cnt == 0 { f64::NAN } else { sum / cnt as f64 };
            if cnt < 2 {
                (0.0, avg) // scanpy: a lone gene's dispersion is divided by itself
            } else {
                (avg, (m2 / (cnt - 1) as f64).sqrt())
            }
        })
        .collect();
    let dispersions_norm: Vec<f64> = bins
        .iter()
        .zip(&dispersions)
        .map(|(&b, &d)| (d - norm_stats[b].0) / norm_stats[b].1)
        .collect();
    let highly_variable: Vec<bool> = match params.n_top_genes {
        Some(n_top) => {
            let mut valid: Vec<f64> = dispersions_norm
                .iter()
                .copied()
                .filter(|d| !d.is_nan())
                .collect();
            if valid.is_empty() {
                return Err(Error::config(
                    "n_top_genes",
                    format!("none of the {} genes has a normalised dispersion", x.n_cols),
                ));
            }
            let k = n_top.min(x.n_cols).min(valid.len());
            valid.sort_unstable_by(|a, b| b.total_cmp(a));
            let cut = valid[k - 1];
            dispersions_norm
                .iter()
                .map(|&d| !d.is_nan() && d >= cut)
                .collect()
        }
        None => means
            .iter()
            .zip(&dispersions_norm)
            .map(|(&m, &d)| {
                // np.nan_to_num: NaN -> 0, ±inf -> ±f64::MAX.
                let d = if d.is_nan() {
                    0.0
                } else {
                    d.clamp(f64::MIN, f64::MAX)
                };
                m > params.min_mean
                    && m < params.max_mean
                    && d > params.min_disp
                    && d < params.max_disp
            })
            .collect(),
    };
    let selected = order_desc(&dispersions_norm)
        .into_iter()
        .filter(|&g| highly_variable[g])
        .collect();
    Ok(Seurat {
        means,
        dispersions,
        dispersions_norm,
        highly_variable,
        selected,
    })
}
