//! `scfm prepare`: input files → a prepared dataset, streaming.
//!
//! Passes over the inputs, one file open at a time:
//! 1. names: each file's genes (and symbols) and its SHA-256 → the vocabulary;
//! 2. (only with `min_cells_per_gene`) counts, per vocabulary gene, the QC-passing cells
//!    that express it, and drops the rare genes from the vocabulary;
//! 3. (only with `hvg`) two passes for scanpy's seurat_v3 highly variable genes (moments,
//!    then clipped moments); the vocabulary keeps the `hvg` most variable genes;
//! 4. reads blocks of cells, checks the counts, applies the QC filters, remaps the columns
//!    to the vocabulary, and appends the cells to the shard being filled; a full shard is
//!    written (deterministic bytes), checksummed and stored.
//!
//! Peak memory: one shard being filled plus one block (and, for formats other than CSR
//! `.h5ad`, the one file being read). `dataset.json` is deleted first and written last, so
//! an interrupted run never leaves a description pointing at missing shards.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::obs_names::UniqueObsNames;
use super::{
    DATASET_JSON, DatasetManifest, DatasetStats, FORMAT, ShardInfo, SourceInfo, VERSION, VOCAB_TSV,
    VocabEntry, vocab_tsv,
};
use crate::data::CsrMatrix;
use crate::data::h5ad::MatrixSource;
use crate::data::h5ad::write::{Codec, ShardContents, WriteOptions, write_h5ad};
use crate::data::inputs::InputReader;
use crate::data::preprocess::check_counts_at;
use crate::data::preprocess::hvg::SeuratV3Stream;
use crate::data::preprocess::qc::{CellFilter, filter_cells};
use crate::data::preprocess::vocab::{ColumnRemap, GeneSource, VocabMode, build_vocab};
use crate::data::read::{GeneIdColumn, InputFormat, ReadOptions, names_look_swapped};
use crate::error::{Error, Result};
use crate::runtime::Rt;
use crate::storage::{Store, sha256_hex};

/// How `scfm prepare` reads, filters and shards its inputs (recorded in `dataset.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareSettings {
    /// `.h5ad` inputs: the matrix holding the counts (`X`, `{Layer: NAME}`, `Raw`).
    pub source: MatrixSource,
    /// 10x/loom inputs: gene symbols or gene ids as identifiers.
    pub gene_ids: GeneIdColumn,
    /// 10x h5 inputs: the genome to read.
    pub genome: Option<String>,
    /// Make repeated gene names unique (`-1`, `-2`, …) instead of failing.
    pub make_unique: bool,
    /// CSV/TSV inputs are genes × cells (a header row of cell names, one gene per line).
    pub transpose: bool,
    /// `union`, `intersection`, or the path of a gene list file (one gene per line).
    pub vocab: String,
    /// Drop vocabulary genes expressed in fewer QC-passing cells (an extra pass).
    pub min_cells_per_gene: Option<u32>,
    /// Keep only this many highly variable genes in the vocabulary: scanpy's
    /// `highly_variable_genes(flavor="seurat_v3", n_top_genes=N)` on the counts of the
    /// QC-passing cells of all inputs together (two extra passes). The genes keep their
    /// vocabulary order.
    pub hvg: Option<usize>,
    /// Keep cells with at least this many expressed genes.
    pub min_genes: Option<u32>,
    /// Keep cells with at most this many expressed genes.
    pub max_genes: Option<u32>,
    /// Keep cells with at least this total count.
    pub min_counts: Option<f32>,
    /// Keep cells with at most this total count.
    pub max_counts: Option<f32>,
    /// Keep cells with at most this percentage of mitochondrial counts.
    pub max_pct_mt: Option<f32>,
    /// Prefix of mitochondrial gene symbols, matched case-insensitively (`MT-` matches
    /// human `MT-` and mouse `mt-`).
    pub mt_prefix: String,
    /// Accept non-integer values (by default only raw counts are accepted).
    pub allow_non_integer: bool,
    /// Cells per shard (the last shard holds the rest).
    pub shard_cells: usize,
    /// Cells read per block.
    pub read_block: usize,
    /// Compression of the shards' datasets.
    pub codec: Codec,
    /// Byte-shuffle values before compressing them (HDF5's shuffle filter; ~2× smaller
    /// and faster to read LZF shards). Ignored with `codec: none`.
    pub shuffle: bool,
}

impl Default for PrepareSettings {
    fn default() -> Self {
        PrepareSettings {
            source: MatrixSource::X,
            gene_ids: GeneIdColumn::Symbols,
            genome: None,
            make_unique: false,
            transpose: false,
            vocab: "union".into(),
            min_cells_per_gene: None,
            hvg: None,
            min_genes: None,
            max_genes: None,
            min_counts: None,
            max_counts: None,
            max_pct_mt: None,
            mt_prefix: "MT-".into(),
            allow_non_integer: false,
            shard_cells: 20_000,
            read_block: 4096,
            codec: Codec::default(),
            shuffle: true,
        }
    }
}

impl PrepareSettings {
    pub(crate) fn read_options(&self) -> ReadOptions {
        let mut o = ReadOptions {
            genome: self.genome.clone(),
            gene_id_column: self.gene_ids,
            make_unique: self.make_unique,
            transpose: self.transpose,
            ..ReadOptions::default()
        };
        o.h5ad.source = self.source.clone();
        o
    }

    pub(crate) fn cell_filter(&self) -> CellFilter {
        CellFilter {
            min_genes: self.min_genes,
            max_genes: self.max_genes,
            min_counts: self.min_counts,
            max_counts: self.max_counts,
            max_pct_mt: self.max_pct_mt,
        }
    }

    /// Checks the settings; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.shard_cells == 0 {
            return Err(Error::config("shard_cells", "must be at least 1"));
        }
        if self.read_block == 0 {
            return Err(Error::config("read_block", "must be at least 1"));
        }
        if self.hvg == Some(0) {
            return Err(Error::config("hvg", "must be at least 1 gene"));
        }
        if let Some(p) = self.max_pct_mt
            && !(0.0..=100.0).contains(&p)
        {
            return Err(Error::config(
                "max_pct_mt",
                format!("{p} is not a percentage (0–100)"),
            ));
        }
        Ok(())
    }

    fn vocab_mode(&self) -> Result<VocabMode> {
        Ok(match self.vocab.as_str() {
            "union" => VocabMode::Union,
            "intersection" => VocabMode::Intersection,
            path => VocabMode::fixed_from_file(Path::new(path))?,
        })
    }
}

/// Where `scfm prepare` is, for progress display.
#[derive(Debug, Clone)]
pub struct PrepareProgress {
    /// Pass name: `names`, `genes`, `hvg-moments`, `hvg-clipped` or `shards`.
    pub pass: &'static str,
    /// Index of the file being read.
    pub file: usize,
    /// Number of input files.
    pub n_files: usize,
    /// Cells read so far in this pass, over all files.
    pub cells_read: usize,
    /// Cells in all files.
    pub cells_total: usize,
    /// Shards written so far.
    pub shards: usize,
}

/// What pass 1 learns about one input.
struct Source {
    path: PathBuf,
    names: Vec<String>,
    symbols: Option<Vec<String>>,
    /// CSV/TSV inputs (whose orientation is a choice): their cell names, to compare with
    /// the genes of the vocabulary.
    csv_obs: Option<Vec<String>>,
    info: SourceInfo,
}

/// Runs `scfm prepare`: reads `inputs` in order and writes the prepared dataset at `out`
/// (a local path or object-store URL). Builds a runtime for its I/O (see
/// [`prepare_on`] to use the caller's): call it from a plain thread, not from inside an
/// async task.
pub fn prepare(
    inputs: &[PathBuf],
    out: &str,
    settings: &PrepareSettings,
    progress: &mut dyn FnMut(&PrepareProgress),
) -> Result<DatasetManifest> {
    let rt = Rt::new().map_err(|source| Error::Io {
        path: out.into(),
        source,
    })?;
    prepare_on(&rt, inputs, out, settings, progress)
}

/// [`prepare`] with its I/O on `rt` (the process's runtime); call it from a plain thread.
pub fn prepare_on(
    rt: &Rt,
    inputs: &[PathBuf],
    out: &str,
    settings: &PrepareSettings,
    progress: &mut dyn FnMut(&PrepareProgress),
) -> Result<DatasetManifest> {
    settings.validate()?;
    if inputs.is_empty() {
        return Err(Error::config("inputs", "no input files given"));
    }
    let store = Store::open(out)?;
    rt.block_on(store.delete(DATASET_JSON))?;
    let opts = settings.read_options();
    let mode = settings.vocab_mode()?;

    // Pass 1: names and checksums.
    let mut sources = Vec::with_capacity(inputs.len());
    let mut obs_names = UniqueObsNames::builder();
    for (i, path) in inputs.iter().enumerate() {
        let r = InputReader::open(path, &opts)?;
        progress(&PrepareProgress {
            pass: "names",
            file: i,
            n_files: inputs.len(),
            cells_read: 0,
            cells_total: 0,
            shards: 0,
        });
        sources.push(Source {
            path: path.clone(),
            info: SourceInfo {
                path: path.display().to_string(),
                format: r.format().to_string(),
                sha256: file_sha256(path)?,
                n_cells: r.n_rows(),
                n_kept: 0,
                n_qc_removed: 0,
                n_empty_removed: 0,
                genes_in_vocab: 0,
                n_genes: r.var_names().len(),
            },
            names: r.var_names().to_vec(),
            symbols: r.gene_symbols().map(<[String]>::to_vec),
            csv_obs: (r.format() == InputFormat::Csv).then(|| r.obs_names().to_vec()),
        });
        obs_names.add_input(r.obs_names());
    }
    warn_same_files(&sources);
    warn_swapped_tables(&sources, &mode, settings.transpose);
    let obs_names = obs_names.finish();
    let cells_total: usize = sources.iter().map(|s| s.info.n_cells).sum();
    let gs: Vec<GeneSource> = sources
        .iter()
        .map(|s| GeneSource {
            path: &s.path,
            names: &s.names,
        })
        .collect();
    let mut vocab = build_vocab(&gs, &mode)?;

    // Pass 2 (optional): genes expressed in too few cells leave the vocabulary.
    if let Some(min_cells) = settings.min_cells_per_gene {
        let mut n_cells = vec![0u64; vocab.len()];
        let mut read = 0;
        for (i, s) in sources.iter().enumerate() {
            scan(s, &vocab, settings, &opts, &mut |x, _, _| {
                for &c in &x.indices {
                    n_cells[c as usize] += 1;
                }
                read += x.n_rows;
                Ok(())
            })?;
            progress(&PrepareProgress {
                pass: "genes",
                file: i,
                n_files: sources.len(),
                cells_read: read,
                cells_total,
                shards: 0,
            });
        }
        let before = vocab.len();
        vocab = vocab
            .into_iter()
            .zip(&n_cells)
            .filter(|(_, n)| **n >= u64::from(min_cells))
            .map(|(g, _)| g)
            .collect();
        tracing::info!(
            kept = vocab.len(),
            dropped = before - vocab.len(),
            min_cells,
            "genes expressed in too few cells left the vocabulary"
        );
        if vocab.is_empty() {
            return Err(Error::config(
                "min_cells_per_gene",
                format!("no gene is expressed in {min_cells} cells"),
            ));
        }
    }
    // Pass 3 (optional, two reads): the most variable genes form the vocabulary.
    if let Some(n_top) = settings.hvg {
        vocab = select_hvg(
            &sources,
            vocab,
            n_top,
            settings,
            &opts,
            &mut |pass, i, read| {
                progress(&PrepareProgress {
                    pass,
                    file: i,
                    n_files: sources.len(),
                    cells_read: read,
                    cells_total,
                    shards: 0,
                })
            },
        )?;
    }
    let entries = vocab_entries(&vocab, &sources);

    // Pass 4: shards.
    let mut w = ShardWriter::new(rt, &store, settings, &vocab, &entries);
    let mut read = 0;
    let mut obs_names = obs_names;
    for i in 0..sources.len() {
        let (kept_before, source_name) = (w.cells_total, file_label(&sources[i].path));
        let s = &sources[i];
        let mut rename = |names: &[String]| obs_names.next_input(names);
        let stats = scan_named(
            s,
            &vocab,
            settings,
            &opts,
            Some(&mut rename),
            &mut |x, obs, rows_read| {
                read += rows_read;
                w.append(x, obs, &source_name)?;
                progress(&PrepareProgress {
                    pass: "shards",
                    file: i,
                    n_files: sources.len(),
                    cells_read: read,
                    cells_total,
                    shards: w.shards.len(),
                });
                Ok(())
            },
        )?;
        let info = &mut sources[i].info;
        info.n_qc_removed = stats.qc_removed;
        info.n_empty_removed = stats.empty_removed;
        info.genes_in_vocab = stats.genes_in_vocab;
        info.n_kept = w.cells_total - kept_before;
        tracing::info!(file = %info.path, cells = info.n_cells, kept = info.n_kept, qc_removed = info.n_qc_removed, empty_removed = info.n_empty_removed, genes_in_vocab = info.genes_in_vocab, "input done");
    }
    w.flush()?;
    obs_names.report();
    let manifest = w.finish(sources.into_iter().map(|s| s.info).collect())?;
    progress(&PrepareProgress {
        pass: "done",
        file: inputs.len(),
        n_files: inputs.len(),
        cells_read: read,
        cells_total,
        shards: manifest.shards.len(),
    });
    Ok(manifest)
}

/// The `n_top` most variable genes of `vocab` (seurat_v3 over every input's QC-passing
/// cells), in vocabulary order; all of `vocab` when it has no more genes than that.
fn select_hvg(
    sources: &[Source],
    vocab: Vec<String>,
    n_top: usize,
    settings: &PrepareSettings,
    opts: &ReadOptions,
    progress: &mut dyn FnMut(&'static str, usize, usize),
) -> Result<Vec<String>> {
    if vocab.len() <= n_top {
        tracing::warn!(
            genes = vocab.len(),
            hvg = n_top,
            "the vocabulary has no more genes than `hvg` asks for: keeping them all"
        );
        return Ok(vocab);
    }
    let mut hv = SeuratV3Stream::new(vocab.len());
    for (pass, first) in [("hvg-moments", true), ("hvg-clipped", false)] {
        if !first {
            hv.fit(0.3)?;
        }
        let mut read = 0;
        for (i, s) in sources.iter().enumerate() {
            scan(s, &vocab, settings, opts, &mut |x, _, _| {
                if first {
                    hv.add_moments(x);
                } else {
                    hv.add_clipped(x);
                }
                read += x.n_rows;
                Ok(())
            })?;
            progress(pass, i, read);
        }
    }
    let h = hv.finish(n_top)?;
    let kept: Vec<String> = vocab
        .into_iter()
        .zip(&h.highly_variable)
        .filter(|(_, hv)| **hv)
        .map(|(g, _)| g)
        .collect();
    tracing::info!(
        kept = kept.len(),
        "the most variable genes (seurat_v3) form the vocabulary"
    );
    Ok(kept)
}

/// A short name of an input for the shards' `source` column.
fn file_label(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

/// What [`scan`] calls per block: the cells (vocabulary columns), their names, and the
/// number of input rows the block covered.
type BlockFn<'a> = dyn FnMut(&CsrMatrix, Vec<String>, usize) -> Result<()> + 'a;

/// Per-file outcome of [`scan`].
struct ScanStats {
    qc_removed: usize,
    empty_removed: usize,
    genes_in_vocab: usize,
}

/// Streams the cells of `s` block by block: counts checked, QC-filtered, remapped to
/// `vocab`, cells without any vocabulary gene dropped; calls `f(cells, obs names, rows
/// read)` per block.
fn scan(
    s: &Source,
    vocab: &[String],
    settings: &PrepareSettings,
    opts: &ReadOptions,
    f: &mut BlockFn<'_>,
) -> Result<ScanStats> {
    scan_named(s, vocab, settings, opts, None, f)
}

/// What [`scan_named`] calls once per input with all its cell names: the names the cells
/// get.
type RenameFn<'a> = dyn FnMut(&[String]) -> Vec<String> + 'a;

/// [`scan`], with the cells named by `rename` (given all of the input's cell names) when
/// there is one.
fn scan_named(
    s: &Source,
    vocab: &[String],
    settings: &PrepareSettings,
    opts: &ReadOptions,
    rename: Option<&mut RenameFn<'_>>,
    f: &mut BlockFn<'_>,
) -> Result<ScanStats> {
    let r = InputReader::open(&s.path, opts)?;
    let renamed = rename.map(|g| g(r.obs_names()));
    let obs_names = renamed.as_deref().unwrap_or(r.obs_names());
    let remap = ColumnRemap::new(
        &GeneSource {
            path: &s.path,
            names: r.var_names(),
        },
        vocab,
    )?;
    let filter = settings.cell_filter();
    let mt_names = r.gene_symbols().unwrap_or(r.var_names());
    let prefix = settings.mt_prefix.to_ascii_uppercase();
    let mt_mask: Vec<bool> = mt_names
        .iter()
        .map(|n| n.to_ascii_uppercase().starts_with(&prefix))
        .collect();
    if settings.max_pct_mt.is_some() && !mt_mask.iter().any(|&m| m) {
        tracing::warn!(file = %s.path.display(), prefix = %settings.mt_prefix, "no mitochondrial genes found: max_pct_mt keeps every cell with counts");
    }
    let mut stats = ScanStats {
        qc_removed: 0,
        empty_removed: 0,
        genes_in_vocab: remap.n_kept(),
    };
    let n = r.n_rows();
    for a in (0..n).step_by(settings.read_block) {
        let b = (a + settings.read_block).min(n);
        let x = r.read(a, b)?;
        check_counts_at(&x, &s.path, r.var_names(), !settings.allow_non_integer, a)?;
        let qc = filter_cells(&x, &filter, Some(&mt_mask))?;
        stats.qc_removed += qc.n_removed;
        let y = remap.apply(&qc.x)?;
        let nonempty: Vec<usize> = (0..y.n_rows)
            .filter(|&i| y.indptr[i + 1] > y.indptr[i])
            .collect();
        stats.empty_removed += y.n_rows - nonempty.len();
        let obs = nonempty
            .iter()
            .map(|&i| obs_names[a + qc.kept[i]].clone())
            .collect();
        let y = if nonempty.len() == y.n_rows {
            y
        } else {
            y.select_rows(&nonempty)
        };
        f(&y, obs, b - a)?;
    }
    Ok(stats)
}

/// Warns about every input that is the same file as an earlier one (equal SHA-256): its
/// cells are stored twice.
fn warn_same_files(sources: &[Source]) {
    for (i, s) in sources.iter().enumerate() {
        if let Some(first) = sources[..i].iter().find(|t| t.info.sha256 == s.info.sha256) {
            tracing::warn!(
                file = %s.path.display(),
                same_as = %first.path.display(),
                sha256 = %s.info.sha256,
                "this input has the same contents as an earlier one: its cells are stored twice (their names made unique)"
            );
        }
    }
}

/// Warns about every CSV/TSV input whose cell names match the genes of the other inputs
/// (or of a fixed vocabulary) better than its gene names do: it is probably genes ×
/// cells read as cells × genes (or the reverse, with `transpose`).
fn warn_swapped_tables(sources: &[Source], mode: &VocabMode, transpose: bool) {
    use std::collections::HashSet;
    for (i, s) in sources.iter().enumerate() {
        let Some(obs) = &s.csv_obs else { continue };
        let mut genes: HashSet<&str> = sources
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, t)| t.names.iter().map(String::as_str))
            .collect();
        if let VocabMode::Fixed(list) = mode {
            genes.extend(list.iter().map(String::as_str));
        }
        if genes.is_empty() || names_look_swapped(obs, &s.names).is_some() {
            continue; // nothing to compare with, or the reader warned already
        }
        let frac = |names: &[String]| {
            names.iter().filter(|n| genes.contains(n.as_str())).count() as f64
                / names.len().max(1) as f64
        };
        let (rows, cols) = (frac(obs), frac(&s.names));
        if rows >= 0.5 && cols < 0.1 {
            tracing::warn!(
                file = %s.path.display(),
                "cell and gene names look swapped: {:.0}% of the cell names but {:.0}% of the gene names are genes of the other inputs or of the vocabulary; {}",
                100.0 * rows,
                100.0 * cols,
                if transpose {
                    "it was read as genes x cells (--transpose): is it cells x genes?"
                } else {
                    "is it genes x cells? `--transpose` reads it so"
                }
            );
        }
    }
}

/// Vocabulary entries with symbols taken from the first input that has them.
fn vocab_entries(vocab: &[String], sources: &[Source]) -> Vec<VocabEntry> {
    let mut symbol: HashMap<&str, &str> = HashMap::new();
    for s in sources {
        if let Some(sym) = &s.symbols {
            for (g, y) in s.names.iter().zip(sym) {
                symbol.entry(g.as_str()).or_insert(y.as_str());
            }
        }
    }
    vocab
        .iter()
        .map(|g| VocabEntry {
            gene_id: g.clone(),
            symbol: symbol.get(g.as_str()).unwrap_or(&g.as_str()).to_string(),
        })
        .collect()
}

/// Hex SHA-256 of a file, or of an mtx folder's files in name order.
pub(crate) fn file_sha256(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.into(),
        source,
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(&f).map_err(|source| Error::Io {
            path: f.clone(),
            source,
        })?;
        loop {
            let n = file.read(&mut buf).map_err(|source| Error::Io {
                path: f.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Fills shards and writes them.
struct ShardWriter<'a> {
    rt: &'a Rt,
    store: &'a Store,
    settings: &'a PrepareSettings,
    var_names: &'a [String],
    symbols: Vec<String>,
    tmp: Option<tempfile::TempDir>,
    indptr: Vec<u64>,
    indices: Vec<u32>,
    data: Vec<f32>,
    obs: Vec<String>,
    source: Vec<String>,
    shards: Vec<ShardInfo>,
    cells_total: usize,
    counts_total: f64,
    max_genes: u64,
}

impl<'a> ShardWriter<'a> {
    fn new(
        rt: &'a Rt,
        store: &'a Store,
        settings: &'a PrepareSettings,
        var_names: &'a [String],
        entries: &[VocabEntry],
    ) -> Self {
        ShardWriter {
            rt,
            store,
            settings,
            var_names,
            symbols: entries.iter().map(|e| e.symbol.clone()).collect(),
            tmp: None,
            indptr: vec![0],
            indices: Vec::new(),
            data: Vec::new(),
            obs: Vec::new(),
            source: Vec::new(),
            shards: Vec::new(),
            cells_total: 0,
            counts_total: 0.0,
            max_genes: 0,
        }
    }

    /// Appends cells, writing every shard that fills up.
    fn append(&mut self, x: &CsrMatrix, obs: Vec<String>, source: &str) -> Result<()> {
        for (r, name) in obs.into_iter().enumerate() {
            let (idx, vals) = x.row(r);
            self.indices.extend_from_slice(idx);
            self.data.extend_from_slice(vals);
            self.indptr.push(self.data.len() as u64);
            self.obs.push(name);
            self.source.push(source.to_string());
            self.cells_total += 1;
            self.counts_total += vals.iter().map(|&v| f64::from(v)).sum::<f64>();
            self.max_genes = self.max_genes.max(idx.len() as u64);
            if self.obs.len() == self.settings.shard_cells {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Writes the cells collected so far as the next shard (nothing when there are none).
    fn flush(&mut self) -> Result<()> {
        if self.obs.is_empty() {
            return Ok(());
        }
        let n = self.obs.len();
        let x = CsrMatrix::new(
            "shard",
            n,
            self.var_names.len(),
            std::mem::replace(&mut self.indptr, vec![0]),
            std::mem::take(&mut self.indices),
            std::mem::take(&mut self.data),
        )?;
        let key = format!("shards/shard-{:06}.h5ad", self.shards.len());
        let symbols: &[String] = &self.symbols;
        let source: &[String] = &self.source;
        let contents = ShardContents {
            x: &x,
            obs_names: &self.obs,
            var_names: self.var_names,
            var_columns: &[("gene_symbols", symbols)],
            obs_columns: &[("source", source)],
        };
        let opts = WriteOptions {
            codec: self.settings.codec,
            shuffle: self.settings.shuffle,
            ..WriteOptions::default()
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let (bytes, sha256) = match self.store.local_path(&key) {
            // A local store: written in place (atomically) and hashed from disk, so the
            // shard's bytes are never held in memory.
            Some(dst) => {
                if let Some(dir) = dst.parent() {
                    std::fs::create_dir_all(dir).map_err(io(dir))?;
                }
                write_h5ad(&dst, &contents, &opts)?;
                let len = std::fs::metadata(&dst).map_err(io(&dst))?.len();
                (len, file_sha256(&dst)?)
            }
            None => {
                if self.tmp.is_none() {
                    self.tmp = Some(tempfile::tempdir().map_err(io(&std::env::temp_dir()))?);
                }
                let local = self
                    .tmp
                    .as_ref()
                    .expect("made above")
                    .path()
                    .join("shard.h5ad");
                write_h5ad(&local, &contents, &opts)?;
                let bytes = std::fs::read(&local).map_err(io(&local))?;
                let sha = sha256_hex(&bytes);
                let len = bytes.len() as u64;
                self.rt.block_on(self.store.put(&key, Bytes::from(bytes)))?;
                (len, sha)
            }
        };
        let info = ShardInfo {
            path: key.clone(),
            n_cells: n,
            nnz: x.nnz() as u64,
            bytes,
            sha256,
        };
        tracing::info!(shard = %key, cells = n, sha256 = %info.sha256, "shard written");
        // Keep the buffers' capacity for the next shard (no regrowth by doubling).
        let CsrMatrix {
            mut indptr,
            mut indices,
            mut data,
            ..
        } = x;
        indptr.clear();
        indptr.push(0);
        indices.clear();
        data.clear();
        (self.indptr, self.indices, self.data) = (indptr, indices, data);
        self.shards.push(info);
        self.obs.clear();
        self.source.clear();
        Ok(())
    }

    /// Writes `vocab.tsv`, then `dataset.json`, then removes shards of earlier runs that
    /// this dataset does not list.
    fn finish(self, sources: Vec<SourceInfo>) -> Result<DatasetManifest> {
        if self.cells_total == 0 {
            return Err(Error::config(
                "inputs",
                "no cell passed the filters: nothing to write",
            ));
        }
        let entries: Vec<VocabEntry> = self
            .var_names
            .iter()
            .zip(&self.symbols)
            .map(|(g, s)| VocabEntry {
                gene_id: g.clone(),
                symbol: s.clone(),
            })
            .collect();
        let tsv = vocab_tsv(&entries);
        let nnz: u64 = self.shards.iter().map(|s| s.nnz).sum();
        let n = self.cells_total as f64;
        let manifest = DatasetManifest {
            format: FORMAT.into(),
            version: VERSION,
            vocab: VOCAB_TSV.into(),
            vocab_sha256: sha256_hex(tsv.as_bytes()),
            n_genes: self.var_names.len(),
            n_cells: self.cells_total,
            nnz,
            stats: DatasetStats {
                mean_genes_per_cell: nnz as f64 / n,
                mean_counts_per_cell: self.counts_total / n,
                max_genes_per_cell: self.max_genes,
            },
            shards: self.shards,
            preprocessing: self.settings.clone(),
            sources,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let rt = self.rt;
        rt.block_on(async {
            self.store.put(VOCAB_TSV, Bytes::from(tsv)).await?;
            self.store.put(DATASET_JSON, Bytes::from(json)).await?;
            for key in self.store.list("shards").await? {
                if !manifest.shards.iter().any(|s| s.path == key) {
                    tracing::info!(key = %key, "removing a shard of an earlier run");
                    self.store.delete(&key).await?;
                }
            }
            Ok::<_, Error>(())
        })?;
        Ok(manifest)
    }
}
