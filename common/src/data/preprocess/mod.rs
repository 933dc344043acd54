//! Preprocessing of cells × genes matrices, matching scanpy 1.11 on the same input.
//!
//! - [`qc`]: per-cell and per-gene QC metrics (`sc.pp.calculate_qc_metrics`) and the
//!   cell/gene filters (`sc.pp.filter_cells`, `sc.pp.filter_genes`, a maximum
//!   mitochondrial percentage).
//! - [`normalize`]: `sc.pp.normalize_total` and `sc.pp.log1p` with scanpy's float32
//!   arithmetic.
//! - [`hvg`]: highly variable genes, `flavor="seurat_v3"` on counts (with [`loess`], a port
//!   of the loess that scanpy calls through scikit-misc) and `flavor="seurat"` on log data.
//! - [`genelist`]: saving and loading gene lists (one name per line) and resolving them
//!   against a dataset's genes.
//! - [`vocab`]: one gene vocabulary for several datasets (union, intersection or a fixed
//!   file) and the remapping of each dataset's columns into it.
//!
//! This module also keeps [`check_counts`] and the per-row [`normalize_log1p`] used by the
//! trainer, plus column selection helpers shared by the submodules.

pub mod genelist;
pub mod hvg;
pub mod loess;
pub mod normalize;
pub mod qc;
pub mod vocab;

#[cfg(test)]
mod tests;

use std::path::Path;

use super::{CellDataset, CsrMatrix};
use crate::error::{Error, Result};

/// Counts at or above this (2^24) cannot be held exactly in float32, the type counts are
/// read into and stored in shards: 2^24 + 1 already rounds to 2^24.
pub const MAX_EXACT_COUNT: f32 = 16_777_216.0;

/// Checks that every stored value is a finite, non-negative count below
/// [`MAX_EXACT_COUNT`].
///
/// `require_integer` also rejects non-integer values (raw counts are integers; a
/// matrix of normalised values passed as counts is a common mistake). The error
/// names the file, the cell (row) and the gene (column) of the first bad value.
pub fn check_counts(
    x: &CsrMatrix,
    path: &Path,
    var_names: &[String],
    require_integer: bool,
) -> Result<()> {
    check_counts_at(x, path, var_names, require_integer, 0)
}

/// [`check_counts`] for a block of cells that starts at cell `first_row` of the file
/// (errors give the cell's index in the file).
pub fn check_counts_at(
    x: &CsrMatrix,
    path: &Path,
    var_names: &[String],
    require_integer: bool,
    first_row: usize,
) -> Result<()> {
    for r in 0..x.n_rows {
        let (idx, vals) = x.row(r);
        for (&c, &v) in idx.iter().zip(vals) {
            let problem = if v.is_nan() {
                Some("NaN")
            } else if v.is_infinite() {
                Some("infinite")
            } else if v < 0.0 {
                Some("negative")
            } else if require_integer && v.fract() != 0.0 {
                Some("non-integer")
            } else if v >= MAX_EXACT_COUNT {
                Some("large")
            } else {
                None
            };
            if let Some(p) = problem {
                let gene = var_names.get(c as usize).map(String::as_str).unwrap_or("?");
                let cell = first_row + r;
                let what = format!("{p} count {v} at cell {cell}, gene {c} (`{gene}`)");
                return Err(Error::format(
                    path,
                    match p {
                        "non-integer" => format!(
                            "{what}; expected raw counts (finite, >= 0, integer): normalised data? `allow_non_integer` accepts it (`scfm prepare --allow-non-integer`, `data.allow_non_integer: true` for training)"
                        ),
                        "large" => format!(
                            "count {v} at cell {cell}, gene {c} (`{gene}`) is at or above 2^24 = 16777216: counts are held as float32, which holds every integer exactly only below that, so this count may be rounded already"
                        ),
                        _ => format!(
                            "{what}; expected raw counts (finite, >= 0{})",
                            if require_integer { ", integer" } else { "" }
                        ),
                    },
                ));
            }
        }
    }
    Ok(())
}

/// `log1p(v / (total / target_sum))` for one cell's stored values, in place, with the
/// arithmetic of [`normalize::normalize_total`] + [`normalize::log1p`] (scanpy's): the
/// total is a float64 sum stored as f32, the factor `total / target` is f32, and values are
/// divided by it in f32. A cell with zero total is left as is. Returns the factor (the
/// cell's depth, `total / target_sum`), so the counts are `expm1(value) * factor`.
///
/// Small integer counts repeat within a cell, so their results are computed once per
/// cell (the same expression, so the values are identical).
pub fn normalize_log1p(values: &mut [f32], target_sum: f64) -> f32 {
    let total = values.iter().fold(0f64, |s, &v| s + f64::from(v)) as f32;
    let factor = total / target_sum as f32;
    if total <= 0.0 {
        return factor;
    }
    let mut table = [f32::NAN; 64];
    for v in values.iter_mut() {
        // `as i32` is one instruction (`as usize` is several on x86-64); a value that is
        // not a small integer (or NaN, which converts to 0) fails the equality.
        let c = *v as i32 as usize;
        if c < table.len() && c as f32 == *v {
            if table[c].is_nan() {
                table[c] = (*v / factor).ln_1p();
            }
            *v = table[c];
        } else {
            *v = (*v / factor).ln_1p();
        }
    }
    factor
}

/// Applies [`normalize_log1p`] to every row of `x`.
pub fn normalize_log1p_matrix(x: &mut CsrMatrix, target_sum: f64) {
    for r in 0..x.n_rows {
        let (a, b) = (x.indptr[r] as usize, x.indptr[r + 1] as usize);
        normalize_log1p(&mut x.data[a..b], target_sum);
    }
}

/// Columns `cols` (in that order) of `x` as a new matrix; within each row the stored values
/// are re-sorted by their new column index, so `cols` may be in any order but must not
/// repeat a column.
///
/// # Panics
/// If a column index is `>= x.n_cols` or repeated (a caller bug, not a data error).
pub fn select_columns(x: &CsrMatrix, cols: &[usize]) -> CsrMatrix {
    let mut map = vec![u32::MAX; x.n_cols];
    for (new, &old) in cols.iter().enumerate() {
        assert!(map[old] == u32::MAX, "column {old} selected twice");
        map[old] = new as u32;
    }
    remap_columns(x, &map, cols.len())
}

/// Moves each stored value of `x` from column `c` to column `map[c]`, dropping values whose
/// `map[c]` is `u32::MAX`; the result has `n_cols` columns and sorted indices per row.
pub(crate) fn remap_columns(x: &CsrMatrix, map: &[u32], n_cols: usize) -> CsrMatrix {
    let mut indptr = Vec::with_capacity(x.n_rows + 1);
    let (mut indices, mut data) = (Vec::new(), Vec::new());
    let mut row: Vec<(u32, f32)> = Vec::new();
    indptr.push(0u64);
    for r in 0..x.n_rows {
        let (idx, vals) = x.row(r);
        row.clear();
        row.extend(
            idx.iter()
                .zip(vals)
                .filter_map(|(&c, &v)| Some((map[c as usize], v)).filter(|p| p.0 != u32::MAX)),
        );
        if row.windows(2).any(|w| w[0].0 >= w[1].0) {
            row.sort_unstable_by_key(|p| p.0);
        }
        indices.extend(row.iter().map(|p| p.0));
        data.extend(row.iter().map(|p| p.1));
        indptr.push(data.len() as u64);
    }
    CsrMatrix {
        n_rows: x.n_rows,
        n_cols,
        indptr,
        indices,
        data,
    }
}

/// The cells `cells` and genes `genes` of `ds` (in those orders), with names and labels.
///
/// # Panics
/// If an index is out of range or a gene is repeated.
pub fn subset_dataset(ds: &CellDataset, cells: &[usize], genes: &[usize]) -> CellDataset {
    let x = select_columns(&ds.x.select_rows(cells), genes);
    CellDataset {
        x,
        obs_names: cells.iter().map(|&i| ds.obs_names[i].clone()).collect(),
        var_names: genes.iter().map(|&j| ds.var_names[j].clone()).collect(),
        labels: ds
            .labels
            .as_ref()
            .map(|l| cells.iter().map(|&i| l[i].clone()).collect()),
    }
}
