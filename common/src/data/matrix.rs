//! In-memory sparse count matrices (cells × genes, CSR).

use crate::error::{Error, Result};

/// A cells × genes matrix in compressed sparse row form, values as `f32`.
///
/// Invariants (checked by [`CsrMatrix::new`]): `indptr.len() == n_rows + 1`,
/// `indptr` non-decreasing from 0 to `nnz`, every column index `< n_cols`, and
/// column indices strictly increasing within a row.
#[derive(Debug, Clone, PartialEq)]
pub struct CsrMatrix {
    /// Number of rows (cells).
    pub n_rows: usize,
    /// Number of columns (genes).
    pub n_cols: usize,
    /// Row pointers, `n_rows + 1` entries.
    pub indptr: Vec<u64>,
    /// Column index of each stored value.
    pub indices: Vec<u32>,
    /// Stored values.
    pub data: Vec<f32>,
}

impl CsrMatrix {
    /// Builds a matrix and checks its invariants; `what` names the source in errors.
    pub fn new(
        what: &str,
        n_rows: usize,
        n_cols: usize,
        indptr: Vec<u64>,
        indices: Vec<u32>,
        data: Vec<f32>,
    ) -> Result<Self> {
        let m = CsrMatrix {
            n_rows,
            n_cols,
            indptr,
            indices,
            data,
        };
        m.validate(what)?;
        Ok(m)
    }

    /// Checks the structural invariants listed on the type.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |msg: String| Err(Error::format(what, msg));
        if self.indptr.len() != self.n_rows + 1 {
            return bad(format!(
                "indptr has {} entries, expected {}",
                self.indptr.len(),
                self.n_rows + 1
            ));
        }
        if self.indices.len() != self.data.len() {
            return bad(format!(
                "{} indices but {} values",
                self.indices.len(),
                self.data.len()
            ));
        }
        if self.indptr[0] != 0 || *self.indptr.last().unwrap() as usize != self.data.len() {
            return bad("indptr must start at 0 and end at nnz".into());
        }
        // A branch-free pass that vectorizes; the slow loop below only runs to name the
        // first problem.
        let fine = self.indptr.windows(2).all(|w| w[0] <= w[1])
            && (0..self.n_rows).all(|r| {
                let row = &self.indices[self.indptr[r] as usize..self.indptr[r + 1] as usize];
                let next = row.get(1..).unwrap_or_default();
                let increasing = row.iter().zip(next).fold(true, |ok, (a, b)| ok & (a < b));
                increasing && row.last().is_none_or(|&c| (c as usize) < self.n_cols)
            });
        if fine {
            return Ok(());
        }
        for r in 0..self.n_rows {
            let (a, b) = (self.indptr[r] as usize, self.indptr[r + 1] as usize);
            if a > b {
                return bad(format!("indptr decreases at row {r}"));
            }
            let row = &self.indices[a..b];
            for (k, &c) in row.iter().enumerate() {
                if c as usize >= self.n_cols {
                    return bad(format!(
                        "row {r}: column index {c} >= n_cols {}",
                        self.n_cols
                    ));
                }
                if k > 0 && row[k - 1] >= c {
                    return bad(format!("row {r}: column indices not strictly increasing"));
                }
            }
        }
        Ok(())
    }

    /// Number of stored values.
    pub fn nnz(&self) -> usize {
        self.data.len()
    }

    /// The stored column indices and values of row `r`.
    pub fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.indptr[r] as usize, self.indptr[r + 1] as usize);
        (&self.indices[a..b], &self.data[a..b])
    }

    /// Builds a CSR matrix from a dense row-major buffer, dropping zeros.
    pub fn from_dense(n_rows: usize, n_cols: usize, dense: &[f32]) -> Self {
        assert_eq!(dense.len(), n_rows * n_cols, "dense buffer size");
        let mut indptr = Vec::with_capacity(n_rows + 1);
        let (mut indices, mut data) = (Vec::new(), Vec::new());
        indptr.push(0);
        for r in 0..n_rows {
            for (c, &v) in dense[r * n_cols..(r + 1) * n_cols].iter().enumerate() {
                if v != 0.0 {
                    indices.push(c as u32);
                    data.push(v);
                }
            }
            indptr.push(data.len() as u64);
        }
        CsrMatrix {
            n_rows,
            n_cols,
            indptr,
            indices,
            data,
        }
    }

    /// Rows `rows` (in that order) as a new matrix.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let mut indptr = Vec::with_capacity(rows.len() + 1);
        let (mut indices, mut data) = (Vec::new(), Vec::new());
        indptr.push(0);
        for &r in rows {
            let (i, d) = self.row(r);
            indices.extend_from_slice(i);
            data.extend_from_slice(d);
            indptr.push(data.len() as u64);
        }
        CsrMatrix {
            n_rows: rows.len(),
            n_cols: self.n_cols,
            indptr,
            indices,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_roundtrip_and_rows() {
        let m = CsrMatrix::from_dense(2, 3, &[0.0, 1.0, 2.0, 3.0, 0.0, 0.0]);
        assert_eq!(m.indptr, vec![0, 2, 3]);
        assert_eq!(m.row(0), (&[1u32, 2][..], &[1.0f32, 2.0][..]));
        m.validate("t").unwrap();
        let s = m.select_rows(&[1, 0]);
        assert_eq!(s.row(0), (&[0u32][..], &[3.0f32][..]));
    }

    #[test]
    fn invalid_structure_is_named() {
        let e = CsrMatrix::new("x.h5ad", 1, 2, vec![0, 1], vec![5], vec![1.0]).unwrap_err();
        assert!(
            e.to_string().contains("x.h5ad") && e.to_string().contains("column index 5"),
            "{e}"
        );
    }
}
