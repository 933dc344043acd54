//! Reader for AnnData `.h5ad` files (HDF5), written against the on-disk layouts of
//! anndata ≥ 0.8 (`encoding-type` attributes), 0.7, and < 0.7 (`h5sparse_format` groups,
//! compound-record `obs`/`var`, `raw.X`).
//!
//! The matrix (`X`, a layer, or raw) may be a CSR group, a CSC group (converted to CSR)
//! or a dense 2-D dataset; values of any numeric stored type become `f32`. Cell and gene
//! names come from the `obs`/`var` dataframes' index; an optional `obs` column becomes
//! per-cell labels.

mod chunks;

/// The LZF decoder of the raw-chunk reader (exposed for `benches/lzf.rs`, which compares
/// it with liblzf on the same chunks).
pub use self::chunks::lzf_decompress;
pub mod embedding;
mod frame;
pub mod rows;
pub(crate) mod typed;
pub mod write;

#[cfg(test)]
mod tests;

use std::path::Path;

use hdf5::{Dataset, Group, Location, LocationType};

use self::typed::{At, E, R, Src, Stored, Visit, bad, dispatch, opt_attr, str_attr};
use super::{CellDataset, CsrMatrix};
use crate::error::{Error, Result};

/// Which matrix of the file holds the values.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum MatrixSource {
    /// The main matrix `X`.
    #[default]
    X,
    /// The layer of this name (`layers/NAME`), e.g. raw `counts` kept next to a normalized `X`.
    Layer(String),
    /// The raw matrix (`raw/X`, or `raw.X` in files from anndata < 0.7) with its own genes.
    Raw,
}

/// What [`read_h5ad`] reads besides names.
#[derive(Debug, Clone, Default)]
pub struct H5adOptions {
    /// The matrix to read.
    pub source: MatrixSource,
    /// An `obs` column (categorical or strings) to return as per-cell labels; missing
    /// categorical values become `"nan"`.
    pub label_column: Option<String>,
}

/// Reads the matrix chosen by `opts.source` as CSR `f32`, with cell names (`obs` index),
/// gene names (`var` index, or `raw/var` for [`MatrixSource::Raw`]) and optional labels.
///
/// Errors name the file and the missing or malformed element.
pub fn read_h5ad(path: &Path, opts: &H5adOptions) -> Result<CellDataset> {
    let file = open(path)?;
    let c = read_contents(&file, opts).map_err(|e| to_error(path, e))?;
    let (n_rows, n_cols, indptr, indices, data) = c.parts;
    // The structure was checked while reading; `new` checks it again and names the matrix.
    let x = CsrMatrix::new(
        &path.display().to_string(),
        n_rows,
        n_cols,
        indptr,
        indices,
        data,
    )
    .map_err(|e| match e {
        Error::Format { path, message } => Error::Format {
            path,
            message: format!("`{}`: {message}", c.name),
        },
        e => e,
    })?;
    Ok(CellDataset {
        x,
        obs_names: c.obs_names,
        var_names: c.var_names,
        labels: c.labels,
    })
}

/// What [`read_h5ad`] reads from the file, before the matrix is assembled.
struct Contents {
    /// Path of the matrix in the file.
    name: String,
    parts: Parts,
    obs_names: Vec<String>,
    var_names: Vec<String>,
    labels: Option<Vec<String>>,
}

/// Reads names and labels first (cheap, and where most layout errors show), then the matrix.
fn read_contents(file: &Group, opts: &H5adOptions) -> R<Contents> {
    let m = locate(file, &opts.source)?;
    let var_names = names(file, &m, &var_frame(&m), m.n_cols)?;
    let obs_names = names(file, &m, "obs", m.n_rows)?;
    let labels = match &opts.label_column {
        Some(col) => Some(frame::labels(file, "obs", col, m.n_rows)?),
        None => None,
    };
    Ok(Contents {
        parts: read_matrix(&m)?,
        name: m.name,
        obs_names,
        var_names,
        labels,
    })
}

/// The `obs` column `opts.label_column` as one string per cell (categoricals decoded;
/// missing values `"nan"`), without reading the matrix; `None` when no column is asked for.
/// A missing column is an error naming it.
pub fn read_h5ad_labels(path: &Path, opts: &H5adOptions) -> Result<Option<Vec<String>>> {
    let Some(col) = &opts.label_column else {
        return Ok(None);
    };
    let file = open(path)?;
    (|| {
        let m = locate(&file, &opts.source)?;
        Ok(Some(frame::labels(&file, "obs", col, m.n_rows)?))
    })()
    .map_err(|e| to_error(path, e))
}

/// Just the number of cells and the gene names of the matrix chosen by `opts.source`,
/// without reading values.
pub fn read_h5ad_header(path: &Path, opts: &H5adOptions) -> Result<(usize, Vec<String>)> {
    let file = open(path)?;
    (|| {
        let m = locate(&file, &opts.source)?;
        Ok((m.n_rows, names(&file, &m, &var_frame(&m), m.n_cols)?))
    })()
    .map_err(|e| to_error(path, e))
}

/// HDF5 chunk cache per dataset: 32 MiB (libhdf5 1.10's default is 1 MiB, smaller than one
/// row block of a typical matrix); slots a prime well above the chunks that fit.
const CHUNK_CACHE_BYTES: usize = 32 << 20;
const CHUNK_CACHE_SLOTS: usize = 10_007;

/// Opens `path` read-only, telling a missing file and a non-HDF5 file apart.
fn open(path: &Path) -> Result<hdf5::File> {
    std::fs::metadata(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    let mut builder = hdf5::File::with_options();
    builder
        .fapl()
        .chunk_cache(CHUNK_CACHE_SLOTS, CHUNK_CACHE_BYTES, 0.75);
    builder.open(path).map_err(|source| {
        if source.contains_minor(hdf5::MinorErrorCode::NotHdf5) {
            Error::format(path, "not an HDF5 file (an .h5ad file must be HDF5)")
        } else {
            Error::Hdf5 {
                path: path.into(),
                source,
            }
        }
    })
}

/// Turns an error of the element readers into the crate's error for file `path`. Failures
/// of libhdf5 while reading an element (e.g. a missing compression filter) are reported as
/// [`Error::Format`] so that the message names the element.
pub(crate) fn to_error(path: &Path, e: E) -> Error {
    match e {
        E::Bad(message) => Error::format(path, message),
        E::H5 { elem, err } => Error::format(path, format!("cannot read {elem}: {err}")),
    }
}

/// An HDF5 object that is either a group or a dataset.
enum Elem {
    Group(Group),
    Dataset(Dataset),
}

/// The object at `path` below `g` (slash-separated), or `None` if any part is missing.
fn open_elem(g: &Group, path: &str) -> R<Option<Elem>> {
    let mut end = 0;
    for part in path.split('/') {
        end += part.len();
        if !g.link_exists(&path[..end]) {
            return Ok(None);
        }
        end += 1;
    }
    let elem = format!("`{path}`");
    match g.loc_type_by_name(path).at(&elem)? {
        LocationType::Group => Ok(Some(Elem::Group(g.group(path).at(&elem)?))),
        LocationType::Dataset => Ok(Some(Elem::Dataset(g.dataset(path).at(&elem)?))),
        _ => bad(format!("{elem} is neither a group nor a dataset")),
    }
}

/// The dataset `name` of group `g` (named `parent/name` in errors).
fn member(g: &Group, parent: &str, name: &str) -> R<Dataset> {
    match open_elem(g, name)? {
        Some(Elem::Dataset(ds)) => Ok(ds),
        Some(Elem::Group(_)) => bad(format!("`{parent}/{name}` is a group, expected a dataset")),
        None => bad(format!("no `{parent}/{name}` in file")),
    }
}

/// The `encoding-type` attribute of an anndata element, if any.
fn encoding(loc: &Location) -> R<Option<String>> {
    str_attr(loc, "encoding-type")
}

/// How a matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Csr,
    Csc,
    Dense,
}

/// A located matrix element with its layout and shape (cells × genes).
struct Matrix {
    elem: Elem,
    /// Path in the file, e.g. `X`, `layers/counts`, `raw.X`.
    name: String,
    layout: Layout,
    n_rows: usize,
    n_cols: usize,
}

/// The members of group `group` of the file, comma-separated (for hints in errors).
fn member_list(file: &Group, group: &str) -> R<String> {
    let names = match open_elem(file, group)? {
        Some(Elem::Group(g)) => g.member_names().at(&format!("`{group}`"))?,
        _ => Vec::new(),
    };
    Ok(if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    })
}

/// Finds the matrix `source` and reads its layout and shape.
fn locate(file: &Group, source: &MatrixSource) -> R<Matrix> {
    let candidates = match source {
        MatrixSource::X => vec!["X".to_owned()],
        MatrixSource::Layer(l) => vec![format!("layers/{l}")],
        MatrixSource::Raw => vec!["raw/X".to_owned(), "raw.X".to_owned()],
    };
    for name in candidates {
        if let Some(elem) = open_elem(file, &name)? {
            let (layout, n_rows, n_cols) = layout(&elem, &name)?;
            return Ok(Matrix {
                elem,
                name,
                layout,
                n_rows,
                n_cols,
            });
        }
    }
    match source {
        MatrixSource::X => bad(format!(
            "no `X` in file (layers: {})",
            member_list(file, "layers")?
        )),
        MatrixSource::Layer(l) => bad(format!(
            "no layer `{l}` in file (layers: {})",
            member_list(file, "layers")?
        )),
        MatrixSource::Raw => bad("no raw matrix in file (neither `raw/X` nor `raw.X`)"),
    }
}

/// The dataframe holding the gene names of matrix `m`.
fn var_frame(m: &Matrix) -> String {
    match m.name.as_str() {
        "raw/X" => "raw/var".into(),
        "raw.X" => "raw.var".into(),
        _ => "var".into(),
    }
}

/// The index of dataframe `frame`, checked to have `n` entries (the matrix's rows or columns).
fn names(file: &Group, m: &Matrix, frame: &str, n: usize) -> R<Vec<String>> {
    let names = frame::index(file, frame)?;
    if names.len() != n {
        let (what, m_name) = (if frame == "obs" { "rows" } else { "columns" }, &m.name);
        return bad(format!(
            "`{frame}` has {} names but `{m_name}` has {n} {what}",
            names.len()
        ));
    }
    Ok(names)
}

/// Layout and shape (rows, columns) of the matrix element `elem` named `name`.
fn layout(elem: &Elem, name: &str) -> R<(Layout, usize, usize)> {
    let ds = match elem {
        Elem::Dataset(ds) => ds,
        Elem::Group(g) => {
            let (layout, shape_attr) = match encoding(g)?.as_deref() {
                Some("csr_matrix") => (Layout::Csr, "shape"),
                Some("csc_matrix") => (Layout::Csc, "shape"),
                Some(other) => {
                    return bad(format!("unsupported encoding-type `{other}` for `{name}`"));
                }
                // anndata < 0.7 (h5sparse).
                None => match str_attr(g, "h5sparse_format")?.as_deref() {
                    Some("csr") => (Layout::Csr, "h5sparse_shape"),
                    Some("csc") => (Layout::Csc, "h5sparse_shape"),
                    Some(other) => {
                        return bad(format!(
                            "unsupported h5sparse_format `{other}` for `{name}`"
                        ));
                    }
                    None => {
                        return bad(format!(
                            "`{name}` is a group without `encoding-type` or `h5sparse_format` attribute"
                        ));
                    }
                },
            };
            let Some(attr) = opt_attr(g, shape_attr)? else {
                return bad(format!("`{name}` has no `{shape_attr}` attribute"));
            };
            let src = Src::attr(&attr, g, shape_attr);
            return match src.ints::<usize>()?[..] {
                [r, c] => Ok((layout, r, c)),
                ref s => bad(format!("{} has {} values, expected 2", src.name, s.len())),
            };
        }
    };
    match encoding(ds)?.as_deref() {
        None | Some("array") => {}
        Some(other) => return bad(format!("unsupported encoding-type `{other}` for `{name}`")),
    }
    match ds.shape()[..] {
        [r, c] => Ok((Layout::Dense, r, c)),
        ref s => bad(format!(
            "`{name}` is a dense array of {} dimensions, expected 2",
            s.len()
        )),
    }
}

/// A CSR matrix's parts: rows, columns, indptr, indices, data.
type Parts = (usize, usize, Vec<u64>, Vec<u32>, Vec<f32>);

/// Reads matrix `m` as CSR with strictly increasing column indices in each row.
fn read_matrix(m: &Matrix) -> R<Parts> {
    let (name, n_rows, n_cols) = (m.name.as_str(), m.n_rows, m.n_cols);
    let g = match (&m.elem, m.layout) {
        (Elem::Group(g), Layout::Csr | Layout::Csc) => g,
        (Elem::Dataset(ds), _) => {
            if n_rows == 0 || n_cols == 0 {
                return Ok((n_rows, n_cols, vec![0; n_rows + 1], Vec::new(), Vec::new()));
            }
            let src = Src::dataset(ds);
            let desc = src.descriptor()?;
            let visit = Dense {
                ds,
                name,
                n_rows,
                n_cols,
            };
            return dispatch(&desc, visit)
                .unwrap_or_else(|| bad(format!("`{name}` holds {desc}, expected numbers")));
        }
        (Elem::Group(_), Layout::Dense) => unreachable!("dense matrices are datasets"),
    };
    let data = Src::dataset(&member(g, name, "data")?).f32s()?;
    let indices = Src::dataset(&member(g, name, "indices")?).ints::<u32>()?;
    let indptr = Src::dataset(&member(g, name, "indptr")?).ints::<u64>()?;
    if indices.len() != data.len() {
        return bad(format!(
            "`{name}` has {} indices but {} values",
            indices.len(),
            data.len()
        ));
    }
    let csr = m.layout == Layout::Csr;
    let (n_major, n_minor) = if csr {
        (n_rows, n_cols)
    } else {
        (n_cols, n_rows)
    };
    check_indptr(&indptr, n_major, data.len(), name)?;
    if let Some(&i) = indices.iter().find(|&&i| i as usize >= n_minor) {
        let what = if csr { "column" } else { "row" };
        return bad(format!(
            "`{name}/indices` has {what} index {i}, but the shape is {n_rows} × {n_cols}"
        ));
    }
    let (mut indptr, mut indices, mut data) = (indptr, indices, data);
    if !csr {
        (indptr, indices, data) = csc_to_csr(n_rows, n_cols, &indptr, &indices, &data);
    }
    canonicalize(&mut indptr, &mut indices, &mut data);
    Ok((n_rows, n_cols, indptr, indices, data))
}

/// Checks that `indptr` has `n_major + 1` non-decreasing entries from 0 to `nnz`.
pub(crate) fn check_indptr(indptr: &[u64], n_major: usize, nnz: usize, name: &str) -> R<()> {
    if indptr.len() != n_major + 1 {
        return bad(format!(
            "`{name}/indptr` has {} entries, expected {}",
            indptr.len(),
            n_major + 1
        ));
    }
    if indptr[0] != 0 || indptr[n_major] != nnz as u64 {
        return bad(format!(
            "`{name}/indptr` must run from 0 to the number of values ({nnz})"
        ));
    }
    if let Some(k) = indptr.windows(2).position(|w| w[0] > w[1]) {
        return bad(format!("`{name}/indptr` decreases at entry {k}"));
    }
    Ok(())
}

/// Converts a valid CSC matrix to CSR; within each row, columns come out in increasing order.
pub(crate) fn csc_to_csr(
    n_rows: usize,
    n_cols: usize,
    col_ptr: &[u64],
    row_idx: &[u32],
    data: &[f32],
) -> (Vec<u64>, Vec<u32>, Vec<f32>) {
    let mut indptr = vec![0u64; n_rows + 1];
    for &r in row_idx {
        indptr[r as usize + 1] += 1;
    }
    for r in 0..n_rows {
        indptr[r + 1] += indptr[r];
    }
    let mut next: Vec<u64> = indptr[..n_rows].to_vec();
    let (mut indices, mut out) = (vec![0u32; data.len()], vec![0f32; data.len()]);
    for c in 0..n_cols {
        for k in col_ptr[c] as usize..col_ptr[c + 1] as usize {
            let r = row_idx[k] as usize;
            let dst = next[r] as usize;
            (indices[dst], out[dst]) = (c as u32, data[k]);
            next[r] += 1;
        }
    }
    (indptr, indices, out)
}

/// Sorts the column indices of each row and sums duplicates (as scipy's `sum_duplicates`),
/// for files whose CSR rows are not in canonical order. A no-op pass on canonical input.
pub(crate) fn canonicalize(indptr: &mut [u64], indices: &mut Vec<u32>, data: &mut Vec<f32>) {
    let sorted = |r: usize| {
        let row = &indices[indptr[r] as usize..indptr[r + 1] as usize];
        // Branch-free, so it vectorizes.
        let next = row.get(1..).unwrap_or_default();
        row.iter().zip(next).fold(true, |ok, (a, b)| ok & (a < b))
    };
    if (0..indptr.len() - 1).all(sorted) {
        return;
    }
    let (mut w, mut b, mut pairs) = (0usize, 0usize, Vec::new());
    for r in 0..indptr.len() - 1 {
        // Rows are compacted in place: `indptr[r]` is already the new start of row `r`.
        let a = b;
        b = indptr[r + 1] as usize;
        pairs.clear();
        pairs.extend(
            indices[a..b]
                .iter()
                .copied()
                .zip(data[a..b].iter().copied()),
        );
        pairs.sort_by_key(|p| p.0);
        let row_start = w;
        for &(c, v) in &pairs {
            if w > row_start && indices[w - 1] == c {
                data[w - 1] += v;
            } else {
                (indices[w], data[w]) = (c, v);
                w += 1;
            }
        }
        indptr[r + 1] = w as u64;
    }
    indices.truncate(w);
    data.truncate(w);
}

/// Reads a dense 2-D dataset in blocks of rows, keeping non-zero values.
struct Dense<'a> {
    ds: &'a Dataset,
    name: &'a str,
    n_rows: usize,
    n_cols: usize,
}

impl Visit for Dense<'_> {
    type Out = R<Parts>;
    fn visit<S: Stored>(self) -> Self::Out {
        let (n_rows, n_cols) = (self.n_rows, self.n_cols);
        let step = (typed::BLOCK / n_cols).max(1);
        let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
        for a in (0..n_rows).step_by(step) {
            let b = (a + step).min(n_rows);
            let block = self
                .ds
                .read_slice_2d::<S, _>((a..b, ..))
                .at(&format!("`{}`", self.name))?;
            let block = block.as_standard_layout();
            let values = block.as_slice().expect("standard layout is contiguous");
            for row in values.chunks_exact(n_cols) {
                for (c, &v) in row.iter().enumerate() {
                    let v = v.to_f32();
                    if v != 0.0 {
                        indices.push(c as u32);
                        data.push(v);
                    }
                }
                indptr.push(data.len() as u64);
            }
        }
        Ok((n_rows, n_cols, indptr, indices, data))
    }
}
