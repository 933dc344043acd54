//! The prepared dataset (a contract, documented in docs/data.md, "The prepared dataset"):
//! what `scfm prepare` writes and the training loader reads.
//!
//! ```text
//! <url>/dataset.json              DatasetManifest (written last: its presence means complete)
//! <url>/vocab.tsv                 token_id, gene_id, gene_symbol (one gene per line)
//! <url>/shards/shard-000000.h5ad  CSR counts over the whole vocabulary, obs names, `source`
//! ```
//! Shards hold raw counts (float32); normalisation (normalize_total + log1p) is the
//! loader's, so the same prepared data serves any target sum.

mod obs_names;
mod prepare;
#[cfg(test)]
mod tests;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use self::prepare::{PrepareProgress, PrepareSettings, prepare, prepare_on};
use crate::config::model::special;
use crate::error::{Error, Result};
use crate::storage::Store;

/// The name of the dataset description at the root of a prepared dataset.
pub const DATASET_JSON: &str = "dataset.json";
/// The name of the vocabulary table.
pub const VOCAB_TSV: &str = "vocab.tsv";
/// The value of [`DatasetManifest::format`].
pub const FORMAT: &str = "scfm-prepared-dataset";
/// The layout version this build writes and reads.
pub const VERSION: u32 = 1;

/// One shard of a prepared dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// Key below the dataset URL, e.g. `shards/shard-000000.h5ad`.
    pub path: String,
    /// Cells in the shard.
    pub n_cells: usize,
    /// Stored values in the shard.
    pub nnz: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
}

/// One input file of `scfm prepare`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    /// The path as given.
    pub path: String,
    /// Detected format.
    pub format: String,
    /// Hex SHA-256 of the file (of `matrix.mtx*`, then the gene and barcode tables, for an
    /// mtx folder).
    pub sha256: String,
    /// Cells in the file.
    pub n_cells: usize,
    /// Cells written to shards (after QC and after dropping cells with no vocabulary gene).
    pub n_kept: usize,
    /// Cells removed by the QC filters.
    pub n_qc_removed: usize,
    /// Cells with no expressed gene of the vocabulary.
    pub n_empty_removed: usize,
    /// Genes of the file that are in the vocabulary.
    pub genes_in_vocab: usize,
    /// Genes of the file.
    pub n_genes: usize,
}

/// Summary statistics of the prepared cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetStats {
    /// Mean number of expressed genes per cell.
    pub mean_genes_per_cell: f64,
    /// Mean total counts per cell.
    pub mean_counts_per_cell: f64,
    /// Largest number of expressed genes in a cell.
    pub max_genes_per_cell: u64,
}

/// `dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetManifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Layout version ([`VERSION`]).
    pub version: u32,
    /// Key of the vocabulary table ([`VOCAB_TSV`]).
    pub vocab: String,
    /// Hex SHA-256 of the vocabulary table.
    pub vocab_sha256: String,
    /// Genes in the vocabulary (columns of every shard).
    pub n_genes: usize,
    /// Cells over all shards.
    pub n_cells: usize,
    /// Stored values over all shards.
    pub nnz: u64,
    /// The shards, in order.
    pub shards: Vec<ShardInfo>,
    /// Statistics of the prepared cells.
    pub stats: DatasetStats,
    /// The settings `scfm prepare` ran with.
    pub preprocessing: PrepareSettings,
    /// The input files, in order.
    pub sources: Vec<SourceInfo>,
}

impl DatasetManifest {
    /// What the data is, independent of where it lives: a digest of the vocabulary and
    /// of every shard's checksum.
    pub fn identity(&self) -> String {
        let shas: Vec<&str> = self.shards.iter().map(|s| s.sha256.as_str()).collect();
        crate::storage::sha256_hex(format!("{}\n{}", self.vocab_sha256, shas.join("\n")).as_bytes())
    }

    /// Parses and checks `dataset.json` (`url` names it in errors).
    pub fn parse(bytes: &[u8], url: &str) -> Result<DatasetManifest> {
        let m: DatasetManifest = serde_json::from_slice(bytes).map_err(|e| Error::Parse {
            path: url.into(),
            message: e.to_string(),
        })?;
        let bad = |message: String| Error::Corrupt {
            url: url.to_string(),
            message,
        };
        if m.format != FORMAT {
            return Err(bad(format!(
                "`format` is `{}`, expected `{FORMAT}`",
                m.format
            )));
        }
        if m.version != VERSION {
            return Err(bad(format!(
                "layout version {} is not supported (this build reads version {VERSION}); \
                 run `scfm prepare` again",
                m.version
            )));
        }
        let cells: usize = m.shards.iter().map(|s| s.n_cells).sum();
        if cells != m.n_cells {
            return Err(bad(format!(
                "shards hold {cells} cells but `n_cells` is {}",
                m.n_cells
            )));
        }
        Ok(m)
    }
}

/// One row of `vocab.tsv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabEntry {
    /// Gene identifier (the shard's var name).
    pub gene_id: String,
    /// Gene symbol (the id again when the inputs had none).
    pub symbol: String,
}

/// `vocab.tsv` text: a header, then `token_id  gene_id  gene_symbol` per gene, where the
/// token id of column `c` is `c + OFFSET` (ids below are reserved for padding and `[CLS]`).
pub fn vocab_tsv(entries: &[VocabEntry]) -> String {
    let mut s = String::from("token_id\tgene_id\tgene_symbol\n");
    for (c, e) in entries.iter().enumerate() {
        s.push_str(&format!(
            "{}\t{}\t{}\n",
            c as i64 + special::OFFSET,
            e.gene_id,
            e.symbol
        ));
    }
    s
}

/// Parses `vocab.tsv` (`url` names it in errors), checking the token ids.
pub fn parse_vocab_tsv(text: &str, url: &str) -> Result<Vec<VocabEntry>> {
    let bad = |message: String| Error::Corrupt {
        url: url.to_string(),
        message,
    };
    let mut lines = text.lines();
    match lines.next() {
        Some("token_id\tgene_id\tgene_symbol") => {}
        other => return Err(bad(format!("bad header line {other:?}"))),
    }
    let mut out = Vec::new();
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let expect = i as i64 + special::OFFSET;
        match f[..] {
            [id, gene, sym] if id.parse::<i64>() == Ok(expect) => out.push(VocabEntry {
                gene_id: gene.to_string(),
                symbol: sym.to_string(),
            }),
            _ => {
                return Err(bad(format!(
                    "line {}: expected `{expect}<TAB>gene_id<TAB>gene_symbol`, found {line:?}",
                    i + 2
                )));
            }
        }
    }
    Ok(out)
}

/// Whether the data location of a training config names a prepared dataset (a URL, or a
/// directory with `dataset.json`) rather than one input file.
pub fn is_prepared(path: &Path) -> bool {
    crate::config::is_url(path) || path.is_dir() && PreparedDataset::is_prepared_dir(path)
}

/// The identity of the training data at `path` (see [`DatasetManifest::identity`]; for one
/// input file, its SHA-256), so that a checkpoint can tell whether it was trained on the
/// same data wherever the data now lives.
pub async fn data_identity(path: &Path) -> Result<String> {
    if is_prepared(path) {
        let d = PreparedDataset::open(&path.to_string_lossy()).await?;
        Ok(d.manifest.identity())
    } else {
        prepare::file_sha256(path)
    }
}

/// A prepared dataset opened from its URL: the description and the vocabulary.
#[derive(Debug, Clone)]
pub struct PreparedDataset {
    /// Where it lives.
    pub store: Store,
    /// `dataset.json`.
    pub manifest: DatasetManifest,
    /// `vocab.tsv`.
    pub vocab: Vec<VocabEntry>,
}

impl PreparedDataset {
    /// Opens the prepared dataset at `url` (local path or object-store URL), checking the
    /// vocabulary against its checksum and the manifest.
    pub async fn open(url: &str) -> Result<PreparedDataset> {
        let store = Store::open(url)?;
        let json_url = store.url_of(DATASET_JSON);
        let Some(bytes) = store.get_opt(DATASET_JSON).await? else {
            return Err(Error::format(
                url,
                "no dataset.json: not a prepared dataset (or `scfm prepare` did not finish)",
            ));
        };
        let manifest = DatasetManifest::parse(&bytes, &json_url)?;
        let vocab_url = store.url_of(&manifest.vocab);
        let vb = store.get(&manifest.vocab).await?;
        let sha = crate::storage::sha256_hex(&vb);
        if sha != manifest.vocab_sha256 {
            return Err(Error::Corrupt {
                url: vocab_url,
                message: format!(
                    "sha256 {sha} differs from dataset.json's {}",
                    manifest.vocab_sha256
                ),
            });
        }
        let text = std::str::from_utf8(&vb).map_err(|e| Error::Corrupt {
            url: vocab_url.clone(),
            message: e.to_string(),
        })?;
        let vocab = parse_vocab_tsv(text, &vocab_url)?;
        if vocab.len() != manifest.n_genes {
            return Err(Error::Corrupt {
                url: vocab_url,
                message: format!(
                    "{} genes but dataset.json says {}",
                    vocab.len(),
                    manifest.n_genes
                ),
            });
        }
        Ok(PreparedDataset {
            store,
            manifest,
            vocab,
        })
    }

    /// Whether `path` (a local directory) holds a prepared dataset.
    pub fn is_prepared_dir(path: &Path) -> bool {
        path.join(DATASET_JSON).is_file()
    }
}
