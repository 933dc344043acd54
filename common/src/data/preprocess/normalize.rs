//! `sc.pp.normalize_total` and `sc.pp.log1p` on a float32 CSR matrix, with scanpy 1.11's
//! arithmetic so that normalised values are bit-for-bit scanpy's:
//!
//! 1. each cell's total is accumulated in float64 and stored as float32 (scanpy's numba
//!    `_normalize_csr`);
//! 2. without a target, the target is `np.median` of those float32 totals over **all**
//!    cells — scanpy's CSR path includes cells with zero counts (its dense path uses only
//!    nonzero totals; the two agree once empty cells are filtered out). An even count takes
//!    the float32 mean of the two middle totals;
//! 3. the per-cell factor is `total / target` in float32 (a factor of 0 becomes 1), and
//!    every value is divided by it in float32.
//!
//! `log1p` is float32 `ln_1p` per stored value; numpy's float32 `log1p` may differ from the
//! C library's in the last bit or two, so log values agree with scanpy to a few ulp.

use super::CsrMatrix;
use crate::error::{Error, Result};

/// Per-cell totals as scanpy's `normalize_total` computes them: float64 sums stored as f32.
pub fn cell_totals(x: &CsrMatrix) -> Vec<f32> {
    (0..x.n_rows)
        .map(|r| x.row(r).1.iter().fold(0f64, |s, &v| s + f64::from(v)) as f32)
        .collect()
}

/// `np.median` of float32 values, in float32 (the mean of the two middle values for an
/// even count). `None` when `values` is empty.
pub fn median_f32(values: &[f32]) -> Option<f32> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable_by(f32::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Scales every cell of `x` in place to a total of `target_sum` (scanpy's
/// `normalize_total(adata, target_sum=...)`), and returns the target used.
///
/// `None` uses the median cell total (see the module docs for which cells count). Cells
/// with no counts stay empty. Errors, naming `target_sum`, if a given target is not a
/// positive finite number, or if the median is 0 (at least half the cells are empty:
/// scanpy would divide by zero; filter empty cells first or pass a target).
pub fn normalize_total(x: &mut CsrMatrix, target_sum: Option<f64>) -> Result<f32> {
    let totals = cell_totals(x);
    let target = match target_sum {
        Some(t) => {
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::config(
                    "target_sum",
                    format!("{t} is not a positive finite number"),
                ));
            }
            t as f32
        }
        None => {
            let m = median_f32(&totals).unwrap_or(0.0);
            if m.is_nan() || m <= 0.0 {
                return Err(Error::config(
                    "target_sum",
                    format!(
                        "median total count of the {} cells is {m}: at least half the cells have \
                         no counts; filter empty cells first or give a target",
                        x.n_rows
                    ),
                ));
            }
            m
        }
    };
    for (r, &total) in totals.iter().enumerate() {
        let mut factor = total / target;
        if factor == 0.0 {
            factor = 1.0;
        }
        let (a, b) = (x.indptr[r] as usize, x.indptr[r + 1] as usize);
        for v in &mut x.data[a..b] {
            *v /= factor;
        }
    }
    Ok(target)
}

/// `ln(1 + v)` of every stored value, in place (scanpy's `log1p`, natural log).
pub fn log1p(x: &mut CsrMatrix) {
    for v in &mut x.data {
        *v = v.ln_1p();
    }
}
