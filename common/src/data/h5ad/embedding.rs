//! Writer of the `.h5ad` that `scfm embed` produces: the input's `obs` and `var`, the
//! embedding in `obsm`, and a description of the model in `uns`.
//!
//! Rows are written as they are computed (the embedding dataset is created at its full
//! size first), and the file is renamed into place only when complete, so memory stays
//! bounded by one batch and readers never see a partial file. `X` is not written (anndata
//! reads such files with `X = None`): the embedding file annotates the input, it does not
//! copy it. The bytes depend only on the contents (no timestamps).

use std::ffi::CString;
use std::os::raw::c_char;
use std::path::{Path, PathBuf};

use hdf5::{Dataset, Group};

use super::write::{commit, encoding, group, str_attr, strings};
use crate::error::{Error, Result};

// libhdf5's object copy, which hdf5-metno does not wrap (`hid_t` is `int64_t`).
unsafe extern "C" {
    fn H5Ocopy(
        src_loc: i64,
        src_name: *const c_char,
        dst_loc: i64,
        dst_name: *const c_char,
        ocpypl: i64,
        lcpl: i64,
    ) -> i32;
}

/// Where the `obs` or `var` dataframe of the output comes from.
#[derive(Debug, Clone)]
pub enum Frame {
    /// Copied verbatim from this `.h5ad` (its `obs` or `var` group, anndata ≥ 0.8 layout).
    CopyFrom(PathBuf),
    /// A dataframe with only this index.
    Index(Vec<String>),
}

/// A value of `uns[<key>]`.
#[derive(Debug, Clone, PartialEq)]
pub enum UnsValue {
    /// A string scalar.
    Str(String),
    /// A numeric scalar.
    Num(f64),
    /// An integer scalar.
    Int(i64),
}

/// An `.h5ad` being written: create, [`EmbeddingWriter::write_rows`], then
/// [`EmbeddingWriter::finish`].
pub struct EmbeddingWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<hdf5::File>,
    emb: Option<Dataset>,
    n_obs: usize,
    dim: usize,
}

/// Whether `path`'s group `name` is an anndata ≥ 0.8 dataframe (safe to copy verbatim).
pub fn has_modern_frame(path: &Path, name: &str) -> bool {
    let Ok(f) = hdf5::File::open(path) else {
        return false;
    };
    let Ok(g) = f.group(name) else { return false };
    g.attr("encoding-type")
        .and_then(|a| a.read_scalar::<hdf5::types::VarLenUnicode>())
        .is_ok_and(|v| v.as_str() == "dataframe")
}

impl EmbeddingWriter {
    /// Starts `path` (written to a temporary file beside it) with `obs` (`n_obs` cells),
    /// `var`, and an empty `obsm[key]` of `n_obs × dim` `f32`.
    pub fn create(
        path: &Path,
        obs: &Frame,
        n_obs: usize,
        var: &Frame,
        key: &str,
        dim: usize,
    ) -> Result<Self> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let h5 = |source| Error::Hdf5 {
            path: path.into(),
            source,
        };
        let made = (|| -> Result<(hdf5::File, Dataset)> {
            let mut builder = hdf5::File::with_options();
            builder.with_fcpl(|p| p.obj_track_times(false));
            builder.with_fapl(|p| {
                p.fclose_degree(hdf5::file::FileCloseDegree::Strong)
                    .file_locking(false)
            });
            let file = builder.create(&tmp).map_err(h5)?;
            encoding(&file, "anndata", "0.1.0").map_err(h5)?;
            frame(&file, "obs", obs, Some(n_obs), path)?;
            frame(&file, "var", var, None, path)?;
            let obsm = group(&file, "obsm").map_err(h5)?;
            encoding(&obsm, "dict", "0.1.0").map_err(h5)?;
            let emb = obsm
                .new_dataset::<f32>()
                .obj_track_times(false)
                .shape([n_obs, dim])
                .create(key)
                .map_err(h5)?;
            encoding(&emb, "array", "0.2.0").map_err(h5)?;
            for name in ["varm", "obsp", "varp", "layers"] {
                let g = group(&file, name).map_err(h5)?;
                encoding(&g, "dict", "0.1.0").map_err(h5)?;
            }
            Ok((file, emb))
        })();
        match made {
            Ok((file, emb)) => Ok(EmbeddingWriter {
                path: path.into(),
                tmp,
                file: Some(file),
                emb: Some(emb),
                n_obs,
                dim,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Writes rows `start..start + rows.len() / dim` of the embedding.
    pub fn write_rows(&mut self, start: usize, rows: &[f32]) -> Result<()> {
        let n = rows.len() / self.dim.max(1);
        if rows.len() != n * self.dim || start + n > self.n_obs {
            return Err(Error::format(
                &self.path,
                format!(
                    "embedding rows {start}..{} ({} values) do not fit {} × {}",
                    start + n,
                    rows.len(),
                    self.n_obs,
                    self.dim
                ),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let arr = ndarray::ArrayView2::from_shape((n, self.dim), rows).expect("shape checked");
        self.emb
            .as_ref()
            .expect("open until finished")
            .write_slice(arr, (start..start + n, ..))
            .map_err(|source| Error::Hdf5 {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes `uns[group]` as a dict of scalars, closes the file and renames it into place.
    pub fn finish(mut self, uns_group: &str, uns: &[(&str, UnsValue)]) -> Result<()> {
        let file = self.file.take().expect("open until finished");
        let h5 = |source| Error::Hdf5 {
            path: self.path.clone(),
            source,
        };
        let done = (|| -> Result<()> {
            let u = group(&file, "uns").map_err(h5)?;
            encoding(&u, "dict", "0.1.0").map_err(h5)?;
            let g = group(&u, uns_group).map_err(h5)?;
            encoding(&g, "dict", "0.1.0").map_err(h5)?;
            for (k, v) in uns {
                scalar(&g, k, v).map_err(h5)?;
            }
            Ok(())
        })();
        let closed = done.and_then(|()| {
            self.emb = None;
            file.close().map_err(h5)
        });
        let result = closed.and_then(|()| commit(&self.tmp, &self.path));
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        result
    }
}

impl Drop for EmbeddingWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Not finished: nothing is left behind.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `obs`/`var`: copied from the source file or an index-only dataframe.
fn frame(file: &Group, name: &str, f: &Frame, expect: Option<usize>, out: &Path) -> Result<()> {
    let h5 = |source| Error::Hdf5 {
        path: out.into(),
        source,
    };
    match f {
        Frame::CopyFrom(src) => {
            let s = hdf5::File::open(src).map_err(|source| Error::Hdf5 {
                path: src.clone(),
                source,
            })?;
            let sg = s.group(name).map_err(|source| Error::Hdf5 {
                path: src.clone(),
                source,
            })?;
            let cname = CString::new(name).expect("no NUL");
            // SAFETY: both ids are open HDF5 locations for the duration of the call and the
            // names are NUL-terminated; default property lists.
            let rc = unsafe { H5Ocopy(s.id(), cname.as_ptr(), file.id(), cname.as_ptr(), 0, 0) };
            drop(sg);
            if rc < 0 {
                return Err(Error::format(
                    src,
                    format!("could not copy its `{name}` into {}", out.display()),
                ));
            }
            Ok(())
        }
        Frame::Index(names) => {
            if let Some(n) = expect
                && names.len() != n
            {
                return Err(Error::format(
                    out,
                    format!("{} {name} names for {n} rows", names.len()),
                ));
            }
            let g = group(file, name).map_err(h5)?;
            str_attr(&g, "_index", "_index").map_err(h5)?;
            g.new_attr::<hdf5::types::VarLenUnicode>()
                .shape(0)
                .create("column-order")
                .map_err(h5)?;
            encoding(&g, "dataframe", "0.2.0").map_err(h5)?;
            let v = strings(names.iter().map(String::as_str)).map_err(h5)?;
            let ds = g
                .new_dataset::<hdf5::types::VarLenUnicode>()
                .obj_track_times(false)
                .shape(v.len())
                .create("_index")
                .map_err(h5)?;
            if !v.is_empty() {
                ds.write_raw(&v).map_err(h5)?;
            }
            encoding(&ds, "string-array", "0.2.0").map_err(h5)
        }
    }
}

/// A scalar element of an anndata dict.
fn scalar(g: &Group, key: &str, v: &UnsValue) -> hdf5::Result<()> {
    match v {
        UnsValue::Str(s) => {
            let ds = g
                .new_dataset::<hdf5::types::VarLenUnicode>()
                .obj_track_times(false)
                .create(key)?;
            ds.write_scalar(&strings([s.as_str()])?[0])?;
            encoding(&ds, "string", "0.2.0")
        }
        UnsValue::Num(x) => {
            let ds = g.new_dataset::<f64>().obj_track_times(false).create(key)?;
            ds.write_scalar(x)?;
            encoding(&ds, "numeric-scalar", "0.2.0")
        }
        UnsValue::Int(x) => {
            let ds = g.new_dataset::<i64>().obj_track_times(false).create(key)?;
            ds.write_scalar(x)?;
            encoding(&ds, "numeric-scalar", "0.2.0")
        }
    }
}
