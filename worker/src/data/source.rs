//! Where training cells are read from: a prepared dataset (shards in object storage,
//! cached locally and verified) or one input file held in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use scfm_common::config::DataConfig;
use scfm_common::data::CsrMatrix;
use scfm_common::data::h5ad::rows::H5adRows;
use scfm_common::data::prepared::{PreparedDataset, VocabEntry};
use scfm_common::data::preprocess::{check_counts, normalize_log1p};
use scfm_common::data::read::{ReadOptions, read_any};
use scfm_common::runtime::Rt;
use scfm_common::storage::sha256_hex;

use super::cache::ShardCache;
use crate::error::{Result, WorkerError};

/// Cells addressed as `(shard, row)`, read in row ranges, log1p-normalised.
pub trait CellSource: Send + Sync {
    /// Rows of each shard.
    fn shard_cells(&self) -> Vec<usize>;
    /// Genes (columns; the model's vocabulary).
    fn n_genes(&self) -> usize;
    /// The genes of the columns, in column order (the model's vocabulary).
    fn vocab(&self) -> Vec<VocabEntry>;
    /// A digest of what the data is (vocabulary and content), for checkpoint compatibility.
    fn identity(&self) -> String;
    /// Rows `a..b` of shard `shard`, normalised (normalize_total + log1p), with each
    /// row's sequencing depth.
    fn read(&self, shard: u32, a: usize, b: usize) -> Result<Block>;
    /// Starts fetching and verifying shards in the background, in this order.
    fn prefetch(&self, _order: Vec<u32>) {}
    /// What it is, for logs.
    fn describe(&self) -> String;
}

/// Rows of cells as the model reads them: log1p-normalised values and, per row, the
/// depth `total counts / target_sum` that normalisation divided by (NaN when unknown), so
/// the counts are `expm1(value) * depth` (the library-size augmentation thins them).
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// Normalised values (`normalize_total(target_sum)` then `log1p`).
    pub x: CsrMatrix,
    /// Each row's depth (`total / target_sum`), NaN when unknown.
    pub depth: Vec<f32>,
    /// The raw counts behind `x.data` (same positions), when they were whole numbers
    /// from 1 up: the library-size augmentation thins them without recovering them from
    /// the values (`round(expm1(value) * depth)`, the same numbers, at a third of the
    /// loader's time).
    pub counts: Option<Vec<u32>>,
}

impl Block {
    /// Normalises raw counts `x` to `target_sum` and log1p, keeping each row's depth (and
    /// the counts, when they are whole numbers from 1 to `u32::MAX`).
    pub fn from_counts(mut x: CsrMatrix, target_sum: f64) -> Block {
        let counts = x
            .data
            .iter()
            .all(|&v| v >= 1.0 && v.fract() == 0.0 && v <= u32::MAX as f32)
            .then(|| x.data.iter().map(|&v| v as u32).collect());
        let depth = (0..x.n_rows)
            .map(|r| {
                let (a, b) = (x.indptr[r] as usize, x.indptr[r + 1] as usize);
                normalize_log1p(&mut x.data[a..b], target_sum)
            })
            .collect();
        Block { x, depth, counts }
    }

    /// The counts of row `r` (see [`Block::counts`]).
    pub fn row_counts(&self, r: usize) -> Option<&[u32]> {
        let (a, b) = (self.x.indptr[r] as usize, self.x.indptr[r + 1] as usize);
        self.counts.as_ref().map(|c| &c[a..b])
    }

    /// Rows `rows` of the block.
    pub fn select_rows(&self, rows: &[usize]) -> Block {
        let x = self.x.select_rows(rows);
        let counts = self.counts.as_ref().map(|_| {
            rows.iter()
                .flat_map(|&r| self.row_counts(r).expect("counts").iter().copied())
                .collect()
        });
        Block {
            x,
            depth: rows.iter().map(|&r| self.depth[r]).collect(),
            counts,
        }
    }
}

/// Opens the data of `cfg`: a prepared dataset when the path is a URL or a directory
/// with `dataset.json` (its I/O on `rt`), else one input file read into memory.
pub fn open_source(cfg: &DataConfig, rt: &Rt) -> Result<Arc<dyn CellSource>> {
    let p = &cfg.path;
    if scfm_common::config::is_url(p) || p.is_dir() && PreparedDataset::is_prepared_dir(p) {
        return Ok(Arc::new(PreparedSource::open(cfg, rt)?));
    }
    Ok(Arc::new(MemorySource::load(cfg)?))
}

/// One input file in memory (a single shard).
pub struct MemorySource {
    x: Block,
    identity: String,
    path: PathBuf,
    var_names: Vec<String>,
}

impl MemorySource {
    /// Reads `cfg.path` (any supported format), checks the counts, drops cells without any
    /// expressed gene, and normalises.
    pub fn load(cfg: &DataConfig) -> Result<MemorySource> {
        let path = &cfg.path;
        let mut opts = ReadOptions {
            transpose: cfg.transpose,
            ..ReadOptions::default()
        };
        opts.h5ad.source = cfg.source.clone();
        let ds = read_any(path, &opts)?;
        // The rule of `scfm prepare`: raw integer counts, unless allowed otherwise.
        check_counts(&ds.x, path, &ds.var_names, !cfg.allow_non_integer)?;
        if cfg.allow_non_integer && ds.x.data.iter().any(|v| v.fract() != 0.0) {
            tracing::warn!(file = %path.display(), "values are not integers (data.allow_non_integer); treating them as counts (normalize_total + log1p is applied)");
        }
        let mut x = ds.x;
        let nonempty: Vec<usize> = (0..x.n_rows)
            .filter(|&r| x.indptr[r + 1] > x.indptr[r])
            .collect();
        if nonempty.len() < x.n_rows {
            tracing::warn!(
                dropped = x.n_rows - nonempty.len(),
                "dropping cells with no expressed genes"
            );
            x = x.select_rows(&nonempty);
        }
        Ok(MemorySource {
            x: Block::from_counts(x, cfg.target_sum),
            identity: sha256_hex(ds.var_names.join("\n").as_bytes()),
            path: path.clone(),
            var_names: ds.var_names,
        })
    }

    /// From a normalised matrix (tests and benchmarks; the depths are unknown).
    pub fn from_matrix(x: CsrMatrix) -> MemorySource {
        MemorySource {
            identity: format!("matrix {}x{}", x.n_rows, x.n_cols),
            var_names: (0..x.n_cols).map(|c| format!("gene{c}")).collect(),
            x: Block {
                depth: vec![f32::NAN; x.n_rows],
                x,
                counts: None,
            },
            path: PathBuf::from("<memory>"),
        }
    }
}

impl CellSource for MemorySource {
    fn shard_cells(&self) -> Vec<usize> {
        vec![self.x.x.n_rows]
    }
    fn n_genes(&self) -> usize {
        self.x.x.n_cols
    }
    fn vocab(&self) -> Vec<VocabEntry> {
        self.var_names
            .iter()
            .map(|g| VocabEntry {
                gene_id: g.clone(),
                symbol: g.clone(),
            })
            .collect()
    }
    fn identity(&self) -> String {
        self.identity.clone()
    }
    fn read(&self, shard: u32, a: usize, b: usize) -> Result<Block> {
        if shard != 0 || a > b || b > self.x.x.n_rows {
            return Err(WorkerError::Internal(format!(
                "rows {a}..{b} of shard {shard} requested from a single-matrix source of {} rows",
                self.x.x.n_rows
            )));
        }
        Ok(self.x.select_rows(&(a..b).collect::<Vec<_>>()))
    }
    fn describe(&self) -> String {
        format!(
            "{} ({} cells x {} genes, in memory)",
            self.path.display(),
            self.x.x.n_rows,
            self.x.x.n_cols
        )
    }
}

/// A prepared dataset: shards verified against `dataset.json` and read by row blocks.
pub struct PreparedSource {
    dataset: PreparedDataset,
    cache: Arc<ShardCache>,
    open: Mutex<HashMap<u32, Arc<H5adRows>>>,
    target_sum: f64,
}

impl PreparedSource {
    /// Opens the prepared dataset at `cfg.path`; its shards are fetched on `rt`.
    pub fn open(cfg: &DataConfig, rt: &Rt) -> Result<PreparedSource> {
        let url = cfg.path.to_string_lossy().into_owned();
        let dataset = rt.block_on(PreparedDataset::open(&url))?;
        let cache_dir = cfg
            .cache_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("scfm-cache"));
        let cache = Arc::new(ShardCache::new(
            dataset.store.clone(),
            dataset.manifest.shards.clone(),
            &cache_dir,
            rt.clone(),
        ));
        Ok(PreparedSource {
            dataset,
            cache,
            open: Mutex::new(HashMap::new()),
            target_sum: cfg.target_sum,
        })
    }

    fn rows(&self, shard: u32) -> Result<Arc<H5adRows>> {
        if let Some(r) = self.open.lock().expect("shard table").get(&shard) {
            return Ok(r.clone());
        }
        let path: PathBuf = self.cache.ensure(shard)?;
        let r = open_shard(&path, &self.dataset, shard)?;
        let r = Arc::new(r);
        self.open
            .lock()
            .expect("shard table")
            .insert(shard, r.clone());
        Ok(r)
    }
}

fn open_shard(path: &Path, ds: &PreparedDataset, shard: u32) -> Result<H5adRows> {
    let info = &ds.manifest.shards[shard as usize];
    let mut r = H5adRows::open(path, &Default::default())?
        .ok_or_else(|| WorkerError::Data(format!("{}: X is not a CSR matrix", path.display())))?;
    // The loader reads on threads of its own (`data.loader_threads`): decoding on the
    // reading thread alone costs the least CPU per cell.
    r.set_decode_threads(1);
    if r.n_rows() != info.n_cells || r.n_cols() != ds.manifest.n_genes {
        return Err(WorkerError::Data(format!(
            "{}: {} x {} cells x genes, but dataset.json says {} x {}",
            ds.store.url_of(&info.path),
            r.n_rows(),
            r.n_cols(),
            info.n_cells,
            ds.manifest.n_genes
        )));
    }
    Ok(r)
}

impl CellSource for PreparedSource {
    fn shard_cells(&self) -> Vec<usize> {
        self.dataset
            .manifest
            .shards
            .iter()
            .map(|s| s.n_cells)
            .collect()
    }
    fn n_genes(&self) -> usize {
        self.dataset.manifest.n_genes
    }
    fn vocab(&self) -> Vec<VocabEntry> {
        self.dataset.vocab.clone()
    }
    fn identity(&self) -> String {
        let m = &self.dataset.manifest;
        let shas: Vec<&str> = m.shards.iter().map(|s| s.sha256.as_str()).collect();
        sha256_hex(format!("{}\n{}", m.vocab_sha256, shas.join("\n")).as_bytes())
    }
    fn read(&self, shard: u32, a: usize, b: usize) -> Result<Block> {
        let x = self.rows(shard)?.read(a, b)?;
        Ok(Block::from_counts(x, self.target_sum))
    }
    fn prefetch(&self, order: Vec<u32>) {
        self.cache.prefetch(order);
    }
    fn describe(&self) -> String {
        let m = &self.dataset.manifest;
        format!(
            "{} ({} cells x {} genes in {} shards)",
            self.dataset.store.url(),
            m.n_cells,
            m.n_genes,
            m.shards.len()
        )
    }
}
