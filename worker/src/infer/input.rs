//! The cells `scfm embed` / `scfm evaluate` read: one input file of raw counts in any
//! supported format (an `.h5ad` with a CSR matrix is streamed in row blocks; other formats
//! are read whole, as their readers do), or a prepared dataset (its shards, in order).

use std::path::{Path, PathBuf};

use scfm_common::data::CsrMatrix;
use scfm_common::data::h5ad::embedding::{Frame, has_modern_frame};
use scfm_common::data::h5ad::rows::{H5adRows, read_obs_names};
use scfm_common::data::h5ad::{H5adOptions, MatrixSource, read_h5ad_header};
use scfm_common::data::prepared::{PreparedDataset, is_prepared};
use scfm_common::data::preprocess::check_counts_at;
use scfm_common::data::read::{InputFormat, ReadOptions, detect_format, read_any};
use scfm_common::runtime::Rt;

use crate::data::cache::ShardCache;
use crate::error::{Result, WorkerError};

/// Rows read at a time from a streamed file.
pub const BLOCK_ROWS: usize = 4096;

/// One part of an input: a file read by row blocks, or a matrix in memory.
enum Part {
    Rows(PathBuf, H5adRows),
    Memory(PathBuf, CsrMatrix),
}

/// An opened input.
pub struct CellInput {
    parts: Vec<Part>,
    /// Gene names of the columns.
    pub var_names: Vec<String>,
    /// Cell names, in order.
    pub obs_names: Vec<String>,
    /// Per-cell labels of the requested `obs` column, when asked for.
    pub labels: Option<Vec<String>>,
    /// Per-cell batch labels, when asked for.
    pub batches: Option<Vec<String>>,
    /// The `obs` dataframe of the output.
    pub obs_frame: Frame,
    /// What it is, for messages.
    pub describe: String,
}

/// What to read besides the counts.
#[derive(Debug, Clone, Default)]
pub struct InputOptions {
    /// Which matrix of an `.h5ad` holds the counts.
    pub source: MatrixSource,
    /// An `obs` column to return as labels.
    pub label_key: Option<String>,
    /// An `obs` column to return as batch labels.
    pub batch_key: Option<String>,
    /// Where the shards of a remote prepared dataset are cached.
    pub cache_dir: Option<PathBuf>,
    /// A CSV/TSV input is genes × cells (a header row of cell names, one gene per line).
    pub transpose: bool,
}

fn data_err(path: &Path, m: impl std::fmt::Display) -> WorkerError {
    WorkerError::Data(format!("{}: {m}", path.display()))
}

impl CellInput {
    /// Opens `input` (a prepared dataset's shards are fetched on `rt`).
    pub fn open(input: &str, opts: &InputOptions, rt: &Rt) -> Result<Self> {
        let path = PathBuf::from(input);
        if is_prepared(&path) {
            return Self::open_prepared(input, opts, rt);
        }
        if !path.exists() {
            return Err(data_err(&path, "no such file or directory"));
        }
        let format = detect_format(&path)?;
        let labels_of = |key: &Option<String>| -> Result<Option<Vec<String>>> {
            let Some(k) = key else { return Ok(None) };
            if format != InputFormat::H5ad {
                return Err(data_err(
                    &path,
                    format!("obs column `{k}` requested, but only .h5ad inputs carry obs columns"),
                ));
            }
            let h = H5adOptions {
                source: opts.source.clone(),
                label_column: Some(k.clone()),
            };
            Ok(scfm_common::data::h5ad::read_h5ad_labels(&path, &h)?)
        };
        let labels = labels_of(&opts.label_key)?;
        let batches = labels_of(&opts.batch_key)?;
        if format == InputFormat::H5ad
            && let Some(rows) = H5adRows::open(&path, &opts.source)?
        {
            let h = H5adOptions {
                source: opts.source.clone(),
                label_column: None,
            };
            let (n, var_names) = read_h5ad_header(&path, &h)?;
            let obs_names = read_obs_names(&path)?;
            if obs_names.len() != n {
                return Err(data_err(
                    &path,
                    format!("{} obs names for {n} cells", obs_names.len()),
                ));
            }
            let obs_frame = if has_modern_frame(&path, "obs") {
                Frame::CopyFrom(path.clone())
            } else {
                Frame::Index(obs_names.clone())
            };
            return Ok(CellInput {
                describe: format!("{} ({n} cells x {} genes)", path.display(), var_names.len()),
                parts: vec![Part::Rows(path, rows)],
                var_names,
                obs_names,
                labels,
                batches,
                obs_frame,
            });
        }
        let mut ro = ReadOptions {
            transpose: opts.transpose,
            ..ReadOptions::default()
        };
        ro.h5ad.source = opts.source.clone();
        let ds = read_any(&path, &ro)?;
        let obs_frame = if format == InputFormat::H5ad && has_modern_frame(&path, "obs") {
            Frame::CopyFrom(path.clone())
        } else {
            Frame::Index(ds.obs_names.clone())
        };
        Ok(CellInput {
            describe: format!(
                "{} ({} cells x {} genes)",
                path.display(),
                ds.x.n_rows,
                ds.x.n_cols
            ),
            parts: vec![Part::Memory(path, ds.x)],
            var_names: ds.var_names,
            obs_names: ds.obs_names,
            labels,
            batches,
            obs_frame,
        })
    }

    fn open_prepared(url: &str, opts: &InputOptions, rt: &Rt) -> Result<Self> {
        if opts.label_key.is_some() || opts.batch_key.is_some() {
            return Err(WorkerError::Data(format!(
                "{url}: a prepared dataset has no label columns; evaluate on an .h5ad input"
            )));
        }
        let ds = rt.block_on(PreparedDataset::open(url))?;
        let cache_dir = opts
            .cache_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("scfm-cache"));
        let cache = ShardCache::new(
            ds.store.clone(),
            ds.manifest.shards.clone(),
            &cache_dir,
            rt.clone(),
        );
        let mut parts = Vec::new();
        let mut obs_names = Vec::new();
        for s in 0..ds.manifest.shards.len() {
            let p = cache.ensure(s as u32)?;
            obs_names.extend(read_obs_names(&p)?);
            let rows = H5adRows::open(&p, &MatrixSource::X)?
                .ok_or_else(|| data_err(&p, "X is not a CSR matrix"))?;
            parts.push(Part::Rows(p, rows));
        }
        Ok(CellInput {
            describe: format!(
                "{} ({} cells x {} genes in {} shards)",
                ds.store.url(),
                ds.manifest.n_cells,
                ds.manifest.n_genes,
                ds.manifest.shards.len()
            ),
            parts,
            var_names: ds.vocab.iter().map(|e| e.gene_id.clone()).collect(),
            obs_frame: Frame::Index(obs_names.clone()),
            obs_names,
            labels: None,
            batches: None,
        })
    }

    /// Number of cells.
    pub fn n_cells(&self) -> usize {
        self.obs_names.len()
    }

    /// Calls `f(first_row, counts)` for consecutive blocks of at most `block` cells, in
    /// order; the counts are checked (no NaN, no negative value) with the file, cell and
    /// gene named.
    pub fn for_each_block(
        &self,
        block: usize,
        mut f: impl FnMut(usize, CsrMatrix) -> Result<()>,
    ) -> Result<()> {
        let mut first = 0;
        let block = block.max(1);
        for part in &self.parts {
            match part {
                Part::Rows(path, rows) => {
                    let n = rows.n_rows();
                    for a in (0..n).step_by(block) {
                        let b = (a + block).min(n);
                        let x = rows.read(a, b)?;
                        check_counts_at(&x, path, &self.var_names, false, a)?;
                        f(first + a, x)?;
                    }
                    first += n;
                }
                Part::Memory(path, x) => {
                    for a in (0..x.n_rows).step_by(block) {
                        let b = (a + block).min(x.n_rows);
                        let m = x.select_rows(&(a..b).collect::<Vec<_>>());
                        check_counts_at(&m, path, &self.var_names, false, a)?;
                        f(first + a, m)?;
                    }
                    first += x.n_rows;
                }
            }
        }
        Ok(())
    }
}
