//! Row-block reading of an `.h5ad` CSR matrix: only `indptr` is held in memory; rows
//! `a..b` are read by hyperslab from `indices` and `data`, so a reader's memory is bounded
//! by the block, not the file. Compressed `indices`/`data` are read by raw chunks and
//! decoded on two threads where possible (see `chunks`). Used by `scfm prepare` (inputs)
//! and the training loader (prepared shards).

use std::path::{Path, PathBuf};

use hdf5::{Dataset, File};

use super::chunks::RawCsr;
use super::typed::{R, Src, bad};
use super::{Elem, Layout, MatrixSource, check_indptr, frame, locate, member, open, to_error};
use crate::data::CsrMatrix;
use crate::error::{Error, Result};

/// An open CSR matrix of an `.h5ad` file, read in blocks of rows.
pub struct H5adRows {
    path: PathBuf,
    /// Kept open for the datasets' lifetime.
    _file: File,
    name: String,
    data: Dataset,
    indices: Dataset,
    indptr: Vec<u64>,
    n_cols: usize,
    /// The raw-chunk path for `indices` and `data`, where it applies.
    raw: RawCsr,
}

impl std::fmt::Debug for H5adRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H5adRows")
            .field("path", &self.path)
            .field("matrix", &self.name)
            .field("n_rows", &self.n_rows())
            .finish()
    }
}

impl H5adRows {
    /// Opens the matrix `source` of `path` for block reads, or `Ok(None)` when it is not
    /// stored as CSR (CSC and dense matrices cannot be read by rows cheaply).
    pub fn open(path: &Path, source: &MatrixSource) -> Result<Option<H5adRows>> {
        let file = open(path)?;
        let r: R<Option<H5adRows>> = (|| {
            let m = locate(&file, source)?;
            let g = match (&m.elem, m.layout) {
                (Elem::Group(g), Layout::Csr) => g.clone(),
                _ => return Ok(None),
            };
            let data = member(&g, &m.name, "data")?;
            let indices = member(&g, &m.name, "indices")?;
            let indptr = Src::dataset(&member(&g, &m.name, "indptr")?).ints::<u64>()?;
            let nnz = data.size();
            if indices.size() != nnz {
                return bad(format!(
                    "`{}` has {} indices but {nnz} values",
                    m.name,
                    indices.size()
                ));
            }
            check_indptr(&indptr, m.n_rows, nnz, &m.name)?;
            let raw = RawCsr::open(&indices, &data);
            Ok(Some(H5adRows {
                path: path.to_path_buf(),
                _file: file.clone(),
                name: m.name,
                data,
                indices,
                indptr,
                n_cols: m.n_cols,
                raw,
            }))
        })();
        r.map_err(|e| to_error(path, e))
    }

    /// Sets how many threads decode the compressed chunks of one read (default 2: the
    /// caller's and a helper, which halves the wall time of long reads). A caller that
    /// already reads on a thread of its own, like the training loader, sets 1: a helper
    /// per read costs CPU time (thread start, hand-offs, caches of another core) that a
    /// busy machine does not have to spare.
    pub fn set_decode_threads(&mut self, threads: usize) {
        self.raw.set_threads(threads);
    }

    /// Number of rows (cells).
    pub fn n_rows(&self) -> usize {
        self.indptr.len() - 1
    }

    /// Number of columns (genes).
    pub fn n_cols(&self) -> usize {
        self.n_cols
    }

    /// Stored values in rows `a..b`.
    pub fn nnz(&self, a: usize, b: usize) -> usize {
        (self.indptr[b] - self.indptr[a]) as usize
    }

    /// The path of the matrix in the file (`X`, `layers/counts`, `raw/X`).
    pub fn matrix_name(&self) -> &str {
        &self.name
    }

    /// Rows `a..b` as CSR (column indices sorted and deduplicated within rows).
    pub fn read(&self, a: usize, b: usize) -> Result<CsrMatrix> {
        if a > b || b > self.n_rows() {
            return Err(Error::format(
                &self.path,
                format!("rows {a}..{b} out of range ({} rows)", self.n_rows()),
            ));
        }
        let (lo, hi) = (self.indptr[a] as usize, self.indptr[b] as usize);
        let r: R<(Vec<u32>, Vec<f32>)> = (|| {
            // The raw-chunk path checks the column indices while decoding.
            let (indices, data) = self.raw.read(lo, hi, self.n_cols)?;
            let indices = match indices {
                Some(v) => v,
                None => {
                    let v = Src::dataset(&self.indices).slice(lo, hi)?.ints::<u32>()?;
                    if let Some(&c) = v.iter().find(|&&c| c as usize >= self.n_cols) {
                        return bad(format!(
                            "`{}/indices` has column index {c}, but the matrix has {} columns",
                            self.name, self.n_cols
                        ));
                    }
                    v
                }
            };
            let data = match data {
                Some(v) => v,
                None => Src::dataset(&self.data).slice(lo, hi)?.f32s()?,
            };
            Ok((indices, data))
        })();
        let (mut indices, mut data) = r.map_err(|e| to_error(&self.path, e))?;
        let mut indptr: Vec<u64> = self.indptr[a..=b].iter().map(|&p| p - lo as u64).collect();
        super::canonicalize(&mut indptr, &mut indices, &mut data);
        CsrMatrix::new(
            &self.path.display().to_string(),
            b - a,
            self.n_cols,
            indptr,
            indices,
            data,
        )
    }
}

#[cfg(test)]
impl H5adRows {
    /// This reader with the raw-chunk path off (tests compare both paths).
    pub(crate) fn without_raw_chunks(mut self) -> Self {
        self.raw = RawCsr::none();
        self
    }

    /// Whether `indices` and `data` are read by raw chunks.
    pub(crate) fn raw_chunks(&self) -> (bool, bool) {
        self.raw.active()
    }
}

/// The `obs` index (cell names) of `path`.
pub fn read_obs_names(path: &Path) -> Result<Vec<String>> {
    let file = open(path)?;
    frame::index(&file, "obs").map_err(|e| to_error(path, e))
}

/// A string column of the `var` dataframe (e.g. `gene_symbols`), or `None` when absent.
pub fn read_var_column(
    path: &Path,
    source: &MatrixSource,
    column: &str,
) -> Result<Option<Vec<String>>> {
    let file = open(path)?;
    let r: R<Option<Vec<String>>> = (|| {
        let m = locate(&file, source)?;
        let frame_name = super::var_frame(&m);
        if !frame::has_column(&file, &frame_name, column)? {
            return Ok(None);
        }
        Ok(Some(frame::labels(&file, &frame_name, column, m.n_cols)?))
    })();
    r.map_err(|e| to_error(path, e))
}
