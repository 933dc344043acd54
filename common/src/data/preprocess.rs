//! Count checks and per-cell normalisation (scanpy's `normalize_total` + `log1p`).

use std::path::Path;

use super::CsrMatrix;
use crate::error::{Error, Result};

/// Checks that every stored value is a finite, non-negative count.
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
            } else {
                None
            };
            if let Some(p) = problem {
                let gene = var_names.get(c as usize).map(String::as_str).unwrap_or("?");
                return Err(Error::format(
                    path,
                    format!(
                        "{p} count {v} at cell {r}, gene {c} (`{gene}`); expected raw counts (finite, >= 0{})",
                        if require_integer { ", integer" } else { "" }
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `log1p(v / sum(row) * target_sum)` for one cell's stored values, in place,
/// computed in f32 as scanpy does for float32 input. A cell with zero total is left as is.
pub fn normalize_log1p(values: &mut [f32], target_sum: f64) {
    let total: f64 = values.iter().map(|&v| v as f64).sum();
    if total <= 0.0 {
        return;
    }
    let scale = (target_sum / total) as f32;
    for v in values.iter_mut() {
        *v = (*v * scale).ln_1p();
    }
}

/// Applies [`normalize_log1p`] to every row of `x`.
pub fn normalize_log1p_matrix(x: &mut CsrMatrix, target_sum: f64) {
    for r in 0..x.n_rows {
        let (a, b) = (x.indptr[r] as usize, x.indptr[r + 1] as usize);
        normalize_log1p(&mut x.data[a..b], target_sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_scanpy() {
        let mut v = vec![1.0f32, 3.0];
        normalize_log1p(&mut v, 1e4);
        assert!((v[0] - (2501.0f32).ln()).abs() < 1e-5 && (v[1] - (7501.0f32).ln()).abs() < 1e-5);
    }

    #[test]
    fn bad_counts_name_cell_and_gene() {
        let names = vec!["A".to_string(), "B".to_string()];
        let m = CsrMatrix::from_dense(2, 2, &[1.0, 0.0, 0.0, -2.0]);
        let e = check_counts(&m, Path::new("c.h5ad"), &names, true)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "bad data in c.h5ad: negative count -2 at cell 1, gene 1 (`B`); expected raw counts (finite, >= 0, integer)"
        );
        let m = CsrMatrix::from_dense(1, 2, &[f32::NAN, 1.0]);
        assert!(
            check_counts(&m, Path::new("c.h5ad"), &names, false)
                .unwrap_err()
                .to_string()
                .contains("NaN count")
        );
        let m = CsrMatrix::from_dense(1, 2, &[0.5, 1.0]);
        assert!(
            check_counts(&m, Path::new("c.h5ad"), &names, true)
                .unwrap_err()
                .to_string()
                .contains("non-integer")
        );
        check_counts(&m, Path::new("c.h5ad"), &names, false).unwrap();
    }
}
