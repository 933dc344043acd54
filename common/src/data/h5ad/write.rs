//! Writer of AnnData `.h5ad` files (anndata ≥ 0.8 encoding) for CSR count shards.
//!
//! The file holds `X` as a `csr_matrix` group (`data` f32, `indices` i32, `indptr` i64),
//! `obs`/`var` dataframes indexed by the cell/gene names (variable-length UTF-8 strings),
//! extra `var` columns as string arrays, extra `obs` columns as categoricals, and the empty
//! `obsm`, `varm`, `obsp`, `varp`, `layers` and `uns` dicts, as anndata writes them.
//!
//! Files are written atomically (a temporary file in the same directory, fsynced, then
//! renamed) and deterministically: the same contents give the same bytes (no object
//! timestamps are stored).

#[cfg(test)]
#[path = "write_tests.rs"]
mod write_tests;

use std::path::{Path, PathBuf};

use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, DatasetBuilderEmpty, Group, H5Type, Location};

use crate::data::CsrMatrix;
use crate::error::{Error, Result};

/// Compression of the written datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// No compression; arrays are stored contiguously (fastest to read by hyperslab).
    None,
    /// LZF (HDF5 filter 32000, as written by h5py/anndata `compression="lzf"`): fast, with
    /// a moderate ratio.
    #[default]
    Lzf,
    /// Deflate at level 4, as anndata's `compression="gzip"`: smaller, slower to write.
    Gzip,
}

/// What a shard holds: the matrix (cells × genes), names, and extra string columns.
#[derive(Debug, Clone, Copy)]
pub struct ShardContents<'a> {
    /// The counts, cells × genes.
    pub x: &'a CsrMatrix,
    /// Cell names (`obs` index), one per row of `x`.
    pub obs_names: &'a [String],
    /// Gene names (`var` index), one per column of `x`.
    pub var_names: &'a [String],
    /// Extra string columns of `var` (e.g. `("gene_symbols", ...)`), one value per gene,
    /// written as string arrays.
    pub var_columns: &'a [(&'a str, &'a [String])],
    /// Extra string columns of `obs` (e.g. `("source", ...)`), one value per cell, written
    /// as categoricals with sorted categories.
    pub obs_columns: &'a [(&'a str, &'a [String])],
}

/// How [`write_h5ad`] lays out the datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteOptions {
    /// Compression of every non-empty dataset.
    pub codec: Codec,
    /// Target size in bytes of one chunk of a compressed dataset (`X/data` and `X/indices`
    /// hold `chunk_bytes / 4` values per chunk); a reader of a row range decompresses
    /// the chunks it touches, so smaller chunks waste less on short ranges and larger ones
    /// compress better. Clamped to 4 KiB..=4 MiB. Ignored by [`Codec::None`], which stores
    /// arrays contiguously.
    pub chunk_bytes: usize,
    /// Apply HDF5's byte-shuffle filter before the codec (every reader of HDF5 has it, so
    /// anndata/h5py open such files). Storing the first bytes of all values together, then
    /// the second bytes, and so on turns the zero high bytes of small counts and gene
    /// indices into long runs: LZF shards become ~2× smaller and faster to decompress.
    /// Ignored by [`Codec::None`].
    pub shuffle: bool,
}

impl Default for WriteOptions {
    /// Byte-shuffled LZF in chunks of 32 KiB (~4 cells of 2k genes per chunk of `X/data`):
    /// a training read of 64 shuffled cells decodes little beyond its rows, and LZF, whose
    /// matches reach back at most 8 KiB, compresses such chunks within 2% of 128 KiB ones.
    fn default() -> Self {
        WriteOptions {
            codec: Codec::Lzf,
            chunk_bytes: 32 << 10,
            shuffle: true,
        }
    }
}

/// Writes `c` to `path` as an `.h5ad` file, replacing any file there.
///
/// The file is written to `<path>.tmp-<pid>` in the same directory, fsynced and renamed
/// onto `path`, so readers never see a partial file; on error the temporary file is
/// removed. The contents are checked first (matrix structure, name and column lengths,
/// column names), and errors name `path`.
pub fn write_h5ad(path: &Path, c: &ShardContents, opts: &WriteOptions) -> Result<()> {
    check(path, c)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = write_file(&tmp, c, opts)
        .map_err(|source| Error::Hdf5 {
            path: path.into(),
            source,
        })
        .and_then(|()| commit(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Fsyncs `tmp`, renames it onto `path` and fsyncs the directory (so the rename survives a
/// crash).
pub(super) fn commit(tmp: &Path, path: &Path) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(tmp))?;
    std::fs::rename(tmp, path).map_err(io(path))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Checks what libhdf5 would reject or anndata would misread.
fn check(path: &Path, c: &ShardContents) -> Result<()> {
    let x = c.x;
    x.validate(&path.display().to_string())?;
    let bad = |m: String| Err(Error::format(path, m));
    if x.n_cols > i32::MAX as usize {
        return bad(format!("{} genes do not fit int32 indices", x.n_cols));
    }
    for (what, names, n) in [
        ("obs names", c.obs_names, x.n_rows),
        ("var names", c.var_names, x.n_cols),
    ] {
        if names.len() != n {
            return bad(format!(
                "{} {what} for a {} × {} matrix",
                names.len(),
                x.n_rows,
                x.n_cols
            ));
        }
        check_strings(path, what, names)?;
    }
    for (frame, cols, n) in [
        ("obs", c.obs_columns, x.n_rows),
        ("var", c.var_columns, x.n_cols),
    ] {
        for (k, (name, values)) in cols.iter().enumerate() {
            if name.is_empty() || name.contains(['/', '\0']) || *name == "_index" || *name == "." {
                return bad(format!("invalid {frame} column name `{name}`"));
            }
            if cols[..k].iter().any(|(other, _)| other == name) {
                return bad(format!("{frame} column `{name}` given twice"));
            }
            if values.len() != n {
                return bad(format!(
                    "{frame} column `{name}` has {} values, expected {n}",
                    values.len()
                ));
            }
            check_strings(path, &format!("{frame} column `{name}`"), values)?;
        }
    }
    Ok(())
}

/// HDF5 variable-length strings end at the first NUL, so values must not contain one.
fn check_strings(path: &Path, what: &str, values: &[String]) -> Result<()> {
    match values.iter().position(|v| v.contains('\0')) {
        Some(i) => Err(Error::format(
            path,
            format!("{what}: value {i} contains a NUL character"),
        )),
        None => Ok(()),
    }
}

/// Writes the whole file at `tmp`; every handle is closed when this returns.
fn write_file(tmp: &Path, c: &ShardContents, opts: &WriteOptions) -> hdf5::Result<()> {
    let mut builder = hdf5::File::with_options();
    builder.with_fcpl(|p| p.obj_track_times(false));
    // No lock: the file is private until renamed, and a lock taken here would outlive the
    // write in any child process forked meanwhile (libhdf5 opens without `O_CLOEXEC`), so
    // readers of the renamed file would fail with "unable to lock file".
    builder.with_fapl(|p| {
        p.fclose_degree(hdf5::file::FileCloseDegree::Strong)
            .file_locking(false)
    });
    let file = builder.create(tmp)?;
    let w = Writer {
        codec: opts.codec,
        chunk_bytes: opts.chunk_bytes.clamp(4 << 10, 4 << 20),
        shuffle: opts.shuffle,
    };
    w.contents(&file, c)?;
    file.close()
}

/// Dataset layout, shared by the element writers.
struct Writer {
    codec: Codec,
    chunk_bytes: usize,
    shuffle: bool,
}

impl Writer {
    /// Every element of the file, in a fixed order (the bytes depend on it).
    fn contents(&self, file: &Group, c: &ShardContents) -> hdf5::Result<()> {
        encoding(file, "anndata", "0.1.0")?;
        self.csr(&group(file, "X")?, c.x)?;
        let obs = self.dataframe(file, "obs", c.obs_names, c.obs_columns)?;
        for (name, values) in c.obs_columns {
            self.categorical(&obs, name, values)?;
        }
        let var = self.dataframe(file, "var", c.var_names, c.var_columns)?;
        for (name, values) in c.var_columns {
            self.string_array(&var, name, values)?;
        }
        for name in ["obsm", "varm", "obsp", "varp", "layers", "uns"] {
            let g = group(file, name)?;
            encoding(&g, "dict", "0.1.0")?;
        }
        Ok(())
    }

    /// `X` as a `csr_matrix` group.
    fn csr(&self, g: &Group, x: &CsrMatrix) -> hdf5::Result<()> {
        encoding(g, "csr_matrix", "0.1.0")?;
        g.new_attr_builder()
            .with_data(&[x.n_rows as i64, x.n_cols as i64])
            .create("shape")?;
        let data = self.dataset::<f32>(g, "data", x.nnz())?;
        if x.nnz() > 0 {
            data.write_raw(&x.data)?;
        }
        self.converted(g, "indices", &x.indices, |&i| i as i32)?;
        self.converted(g, "indptr", &x.indptr, |&p| p as i64)?;
        Ok(())
    }

    /// A dataframe group with its index; the caller adds the columns.
    fn dataframe(
        &self,
        file: &Group,
        name: &str,
        index: &[String],
        columns: &[(&str, &[String])],
    ) -> hdf5::Result<Group> {
        let g = group(file, name)?;
        str_attr(&g, "_index", "_index")?;
        let order = strings(columns.iter().map(|(n, _)| *n))?;
        g.new_attr::<VarLenUnicode>()
            .shape(order.len())
            .create("column-order")?
            .write_raw(&order)?;
        encoding(&g, "dataframe", "0.2.0")?;
        self.string_array(&g, "_index", index)?;
        Ok(g)
    }

    /// A `categorical` group with sorted categories and the narrowest codes pandas uses.
    fn categorical(&self, parent: &Group, name: &str, values: &[String]) -> hdf5::Result<()> {
        let mut cats: Vec<&str> = values.iter().map(String::as_str).collect();
        cats.sort_unstable();
        cats.dedup();
        let code = |v: &String| {
            cats.binary_search(&v.as_str())
                .expect("value is a category")
        };
        let g = group(parent, name)?;
        encoding(&g, "categorical", "0.2.0")?;
        g.new_attr::<bool>()
            .create("ordered")?
            .write_scalar(&false)?;
        self.string_array(&g, "categories", &cats)?;
        let codes = match cats.len() {
            n if n < i8::MAX as usize => self.converted(&g, "codes", values, |v| code(v) as i8)?,
            n if n < i16::MAX as usize => {
                self.converted(&g, "codes", values, |v| code(v) as i16)?
            }
            _ => self.converted(&g, "codes", values, |v| code(v) as i32)?,
        };
        encoding(&codes, "array", "0.2.0")
    }

    /// A `string-array` dataset of variable-length UTF-8 strings.
    fn string_array<S: AsRef<str>>(&self, g: &Group, name: &str, values: &[S]) -> hdf5::Result<()> {
        let ds = self.dataset::<VarLenUnicode>(g, name, values.len())?;
        if !values.is_empty() {
            ds.write_raw(&strings(values.iter().map(AsRef::as_ref))?)?;
        }
        encoding(&ds, "string-array", "0.2.0")
    }

    /// A 1-D dataset of `src` converted by `f`, written in blocks of whole chunks so that
    /// the converted copy stays small.
    fn converted<S, T: H5Type>(
        &self,
        g: &Group,
        name: &str,
        src: &[S],
        f: impl Fn(&S) -> T,
    ) -> hdf5::Result<Dataset> {
        let ds = self.dataset::<T>(g, name, src.len())?;
        let block = (1 << 20) / self.chunk_len::<T>() * self.chunk_len::<T>();
        for (k, part) in src.chunks(block).enumerate() {
            let buf: Vec<T> = part.iter().map(&f).collect();
            ds.write_slice(&buf, k * block..k * block + part.len())?;
        }
        Ok(ds)
    }

    /// Values of type `T` per chunk.
    fn chunk_len<T: H5Type>(&self) -> usize {
        (self.chunk_bytes / T::type_descriptor().size()).max(1)
    }

    /// A 1-D dataset of `n` values of type `T`: chunked and compressed with the codec, or
    /// contiguous for [`Codec::None`] and when empty (HDF5 cannot chunk a fixed-size
    /// dataset of zero length).
    fn dataset<T: H5Type>(&self, g: &Group, name: &str, n: usize) -> hdf5::Result<Dataset> {
        let b = g.new_dataset::<T>().obj_track_times(false);
        let chunked = |b: DatasetBuilderEmpty| {
            let b = b.chunk(self.chunk_len::<T>().min(n));
            if self.shuffle { b.shuffle() } else { b }
        };
        let b = match self.codec {
            _ if n == 0 => b.no_chunk(),
            Codec::None => b.no_chunk(),
            Codec::Lzf => chunked(b).lzf(),
            Codec::Gzip => chunked(b).deflate(4),
        };
        b.shape(n).create(name)
    }
}

/// A new untimed group `name` of `parent`.
pub(super) fn group(parent: &Group, name: &str) -> hdf5::Result<Group> {
    parent
        .create_group_builder()
        .obj_track_times(false)
        .create(name)
}

/// The `encoding-type` and `encoding-version` attributes of an anndata element.
pub(super) fn encoding(loc: &Location, ty: &str, version: &str) -> hdf5::Result<()> {
    str_attr(loc, "encoding-type", ty)?;
    str_attr(loc, "encoding-version", version)
}

/// A scalar variable-length UTF-8 string attribute.
pub(super) fn str_attr(loc: &Location, name: &str, value: &str) -> hdf5::Result<()> {
    let v = strings([value])?;
    loc.new_attr::<VarLenUnicode>()
        .create(name)?
        .write_scalar(&v[0])
}

/// Strings as HDF5 variable-length UTF-8 (checked for NULs by [`check`]).
pub(super) fn strings<'s>(
    values: impl IntoIterator<Item = &'s str>,
) -> hdf5::Result<Vec<VarLenUnicode>> {
    values
        .into_iter()
        .map(|s| {
            s.parse()
                .map_err(|e| hdf5::Error::from(format!("string {s:?}: {e}")))
        })
        .collect()
}
