//! QC metrics and filters, as scanpy's `calculate_qc_metrics`, `filter_cells` and
//! `filter_genes` compute them on a float32 CSR matrix.
//!
//! Arithmetic follows scanpy/scipy so that results are equal, not merely close:
//! per-cell and per-gene totals are float32 sums accumulated in matrix order (scipy's
//! sparse `sum`), means are float64 sums divided by the count, and `pct_counts_*` is
//! `total_sub / total * 100` in float32 (pandas on float32 columns).

use super::{CsrMatrix, select_columns};
use crate::error::{Error, Result};

/// Per-cell metrics of scanpy's `calculate_qc_metrics(adata, qc_vars=["mt"])` (`.obs` side).
#[derive(Debug, Clone, PartialEq)]
pub struct CellQc {
    /// Genes with a nonzero value in the cell (`n_genes_by_counts`).
    pub n_genes_by_counts: Vec<u32>,
    /// Sum of the cell's values (`total_counts`).
    pub total_counts: Vec<f32>,
    /// Sum over the genes of the mask (`total_counts_mt`); zeros without a mask.
    pub total_counts_mt: Vec<f32>,
    /// `total_counts_mt / total_counts * 100` (`pct_counts_mt`); NaN for a cell with no
    /// counts, as in scanpy; zeros without a mask.
    pub pct_counts_mt: Vec<f32>,
}

/// Per-gene metrics of scanpy's `calculate_qc_metrics` (`.var` side).
#[derive(Debug, Clone, PartialEq)]
pub struct GeneQc {
    /// Cells with a nonzero value for the gene (`n_cells_by_counts`).
    pub n_cells_by_counts: Vec<u32>,
    /// Sum of the gene's values over cells (`total_counts`).
    pub total_counts: Vec<f32>,
    /// Mean over all cells, zeros included (`mean_counts`).
    pub mean_counts: Vec<f64>,
    /// `(1 - n_cells_by_counts / n_cells) * 100` (`pct_dropout_by_counts`).
    pub pct_dropout_by_counts: Vec<f64>,
}

/// The mask of genes whose name starts with `prefix`, e.g. `"mt-"` (mouse) or `"MT-"`
/// (human) on gene symbols, like `var_names.str.startswith("MT-")`.
pub fn prefix_mask(names: &[String], prefix: &str) -> Vec<bool> {
    names.iter().map(|n| n.starts_with(prefix)).collect()
}

fn check_mask(x: &CsrMatrix, mask: &[bool]) -> Result<()> {
    if mask.len() != x.n_cols {
        return Err(Error::config(
            "mt_mask",
            format!(
                "mask has {} entries but the matrix has {} genes",
                mask.len(),
                x.n_cols
            ),
        ));
    }
    Ok(())
}

/// Per-cell QC metrics; `mt_mask` (one flag per gene) marks the mitochondrial genes.
///
/// Errors if the mask length differs from the number of genes.
pub fn cell_qc(x: &CsrMatrix, mt_mask: Option<&[bool]>) -> Result<CellQc> {
    if let Some(m) = mt_mask {
        check_mask(x, m)?;
    }
    let n = x.n_rows;
    let mut q = CellQc {
        n_genes_by_counts: Vec::with_capacity(n),
        total_counts: Vec::with_capacity(n),
        total_counts_mt: Vec::with_capacity(n),
        pct_counts_mt: Vec::with_capacity(n),
    };
    for r in 0..n {
        let (idx, vals) = x.row(r);
        let (mut nnz, mut total, mut mt) = (0u32, 0f32, 0f32);
        for (&c, &v) in idx.iter().zip(vals) {
            nnz += u32::from(v != 0.0);
            total += v;
            if mt_mask.is_some_and(|m| m[c as usize]) {
                mt += v;
            }
        }
        q.n_genes_by_counts.push(nnz);
        q.total_counts.push(total);
        q.total_counts_mt.push(mt);
        q.pct_counts_mt.push(if mt_mask.is_some() {
            mt / total * 100.0
        } else {
            0.0
        });
    }
    Ok(q)
}

/// Per-gene QC metrics.
pub fn gene_qc(x: &CsrMatrix) -> GeneQc {
    let g = x.n_cols;
    let mut nnz = vec![0u32; g];
    let mut total = vec![0f32; g];
    let mut sum = vec![0f64; g];
    for (&c, &v) in x.indices.iter().zip(&x.data) {
        let c = c as usize;
        nnz[c] += u32::from(v != 0.0);
        total[c] += v;
        sum[c] += f64::from(v);
    }
    let n = x.n_rows as f64;
    GeneQc {
        pct_dropout_by_counts: nnz.iter().map(|&k| (1.0 - k as f64 / n) * 100.0).collect(),
        mean_counts: sum.iter().map(|&s| s / n).collect(),
        n_cells_by_counts: nnz,
        total_counts: total,
    }
}

/// Which cells to keep. Each bound that is set removes the cells outside it; setting
/// several is the same as calling scanpy's `filter_cells` once per bound (the bounds of
/// one cell do not depend on the other cells).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CellFilter {
    /// Keep cells with at least this many genes with a positive value.
    pub min_genes: Option<u32>,
    /// Keep cells with at most this many genes with a positive value.
    pub max_genes: Option<u32>,
    /// Keep cells whose total count is at least this.
    pub min_counts: Option<f32>,
    /// Keep cells whose total count is at most this.
    pub max_counts: Option<f32>,
    /// Keep cells whose `pct_counts_mt` is at most this (percent, 0–100); a cell with no
    /// counts (undefined percentage) is removed. Needs a mitochondrial mask.
    pub max_pct_mt: Option<f32>,
}

/// Which genes to keep, as scanpy's `filter_genes` (each bound set applies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeneFilter {
    /// Keep genes with a positive value in at least this many cells.
    pub min_cells: Option<u32>,
    /// Keep genes with a positive value in at most this many cells.
    pub max_cells: Option<u32>,
    /// Keep genes whose total count is at least this.
    pub min_counts: Option<f32>,
    /// Keep genes whose total count is at most this.
    pub max_counts: Option<f32>,
}

/// The outcome of a filter: the kept rows or columns and the filtered matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Filtered {
    /// Indices (into the input) of the kept cells or genes, increasing.
    pub kept: Vec<usize>,
    /// How many were removed.
    pub n_removed: usize,
    /// The input restricted to the kept cells or genes.
    pub x: CsrMatrix,
}

fn within<T: PartialOrd>(v: T, min: Option<T>, max: Option<T>) -> bool {
    min.is_none_or(|m| v >= m) && max.is_none_or(|m| v <= m)
}

/// Removes cells outside the bounds of `filter`; `mt_mask` is needed for `max_pct_mt`.
///
/// Gene numbers count values `> 0` and totals are float32 sums, as in scanpy.
/// Errors (naming the field) if `max_pct_mt` is set without a mask or the mask has the
/// wrong length.
pub fn filter_cells(
    x: &CsrMatrix,
    filter: &CellFilter,
    mt_mask: Option<&[bool]>,
) -> Result<Filtered> {
    if filter.max_pct_mt.is_some() && mt_mask.is_none() {
        return Err(Error::config(
            "max_pct_mt",
            "needs a mitochondrial gene mask (e.g. prefix_mask(symbols, \"mt-\"))",
        ));
    }
    let qc = cell_qc(x, mt_mask)?;
    let kept: Vec<usize> = (0..x.n_rows)
        .filter(|&r| {
            let positive = x.row(r).1.iter().filter(|&&v| v > 0.0).count() as u32;
            within(positive, filter.min_genes, filter.max_genes)
                && within(qc.total_counts[r], filter.min_counts, filter.max_counts)
                && filter.max_pct_mt.is_none_or(|m| qc.pct_counts_mt[r] <= m)
        })
        .collect();
    Ok(Filtered {
        n_removed: x.n_rows - kept.len(),
        x: x.select_rows(&kept),
        kept,
    })
}

/// Removes genes outside the bounds of `filter` (cell numbers count values `> 0`).
pub fn filter_genes(x: &CsrMatrix, filter: &GeneFilter) -> Filtered {
    let mut positive = vec![0u32; x.n_cols];
    let mut total = vec![0f32; x.n_cols];
    for (&c, &v) in x.indices.iter().zip(&x.data) {
        positive[c as usize] += u32::from(v > 0.0);
        total[c as usize] += v;
    }
    let kept: Vec<usize> = (0..x.n_cols)
        .filter(|&g| {
            within(positive[g], filter.min_cells, filter.max_cells)
                && within(total[g], filter.min_counts, filter.max_counts)
        })
        .collect();
    Filtered {
        n_removed: x.n_cols - kept.len(),
        x: select_columns(x, &kept),
        kept,
    }
}
