//! The output of a distributed embedding (`scfm-worker embed-shards`): one `.h5ad` part per
//! shard of the prepared dataset, a record of each written after its part, and an index
//! written last.
//!
//! ```text
//! <out>/parts/part-000000.h5ad   the shard's cells: obs names, var = vocabulary, obsm[key], uns['scfm']
//! <out>/parts/part-000000.json   PartRecord (written after the part was uploaded and read back)
//! <out>/index.json               EmbeddingIndex (written when every part is present; its presence means complete)
//! ```
//! Concatenating the parts in index order gives the cells of the dataset in its order.

use bytes::Bytes;
use scfm_common::runtime::Rt;
use scfm_common::storage::{Store, sha256_hex};
use serde::{Deserialize, Serialize};

use crate::error::{Result, WorkerError};

/// The name of the index at the root of the output.
pub const INDEX_JSON: &str = "index.json";
/// [`EmbeddingIndex::format`].
pub const INDEX_FORMAT: &str = "scfm-embedding-index";
/// [`PartRecord::format`].
pub const PART_FORMAT: &str = "scfm-embedding-part";
/// Layout version of the output.
pub const VERSION: u32 = 1;

/// Key of the part of shard `s`.
pub fn part_key(s: usize) -> String {
    format!("parts/part-{s:06}.h5ad")
}

/// Key of the record of shard `s`'s part.
pub fn record_key(s: usize) -> String {
    format!("parts/part-{s:06}.json")
}

/// What makes a part valid for a run: the model, the shard and the embedding's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartIdentity {
    /// SHA-256 of the model's weights.
    pub model_sha256: String,
    /// SHA-256 of the shard file.
    pub shard_sha256: String,
    /// `obsm` key.
    pub key: String,
    /// Embedding width.
    pub dim: usize,
    /// Cells of the shard.
    pub n_cells: usize,
}

/// `parts/part-NNNNNN.json`: one part, written after the part itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    /// Always [`PART_FORMAT`].
    pub format: String,
    /// Shard index in the dataset.
    pub shard: usize,
    /// Key of the part below the output URL.
    pub path: String,
    /// Cells in the part.
    pub n_cells: usize,
    /// Bytes of the part.
    pub bytes: u64,
    /// Hex SHA-256 of the part.
    pub sha256: String,
    /// SHA-256 of the model's weights.
    pub model_sha256: String,
    /// SHA-256 of the shard the cells came from.
    pub shard_sha256: String,
    /// `obsm` key of the embedding.
    pub key: String,
    /// Embedding width.
    pub dim: usize,
}

impl PartRecord {
    /// Whether the record was made by a run with identity `id`.
    pub fn matches(&self, id: &PartIdentity) -> bool {
        self.format == PART_FORMAT
            && self.model_sha256 == id.model_sha256
            && self.shard_sha256 == id.shard_sha256
            && self.key == id.key
            && self.dim == id.dim
            && self.n_cells == id.n_cells
    }
}

/// One part in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexPart {
    /// Shard index in the dataset.
    pub shard: usize,
    /// Key of the part below the output URL.
    pub path: String,
    /// Cells in the part.
    pub n_cells: usize,
    /// Bytes of the part.
    pub bytes: u64,
    /// Hex SHA-256 of the part.
    pub sha256: String,
}

/// `index.json`: every part of a complete embedding, in dataset order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingIndex {
    /// Always [`INDEX_FORMAT`].
    pub format: String,
    /// Layout version ([`VERSION`]).
    pub version: u32,
    /// Where the model came from.
    pub model: String,
    /// SHA-256 of the model's weights.
    pub model_sha256: String,
    /// The prepared dataset's URL.
    pub dataset: String,
    /// The prepared dataset's identity (vocabulary and shard checksums).
    pub dataset_identity: String,
    /// Cells over all parts.
    pub n_cells: usize,
    /// Embedding width.
    pub dim: usize,
    /// `obsm` key of the embedding.
    pub key: String,
    /// The parts, one per shard, in order.
    pub parts: Vec<IndexPart>,
}

/// Blocks on a store operation from synchronous code (a plain thread), on `rt`.
pub fn block_on<T>(rt: &Rt, f: impl std::future::Future<Output = T>) -> Result<T> {
    Ok(rt.block_on(f))
}

/// The record of shard `s`'s part, if one parses.
pub fn read_record(rt: &Rt, out: &Store, s: usize) -> Result<Option<PartRecord>> {
    let Some(b) = block_on(rt, out.get_opt(&record_key(s)))?? else {
        return Ok(None);
    };
    match serde_json::from_slice::<PartRecord>(&b) {
        Ok(r) if r.shard == s && r.path == part_key(s) => Ok(Some(r)),
        Ok(_) | Err(_) => {
            tracing::warn!(record = %out.url_of(&record_key(s)), "ignoring a malformed part record");
            Ok(None)
        }
    }
}

/// Whether shard `s`'s part is done for `id`: its record matches and the part's bytes
/// have the recorded SHA-256.
pub fn part_verified(rt: &Rt, out: &Store, s: usize, id: &PartIdentity) -> Result<bool> {
    let Some(rec) = read_record(rt, out, s)? else {
        return Ok(false);
    };
    if !rec.matches(id) {
        return Ok(false);
    }
    let Some(bytes) = block_on(rt, out.get_opt(&rec.path))?? else {
        return Ok(false);
    };
    Ok(bytes.len() as u64 == rec.bytes && sha256_hex(&bytes) == rec.sha256)
}

/// Uploads `bytes` as shard `s`'s part, reads it back to check its SHA-256, then writes
/// its record. The old record goes first, so a record always describes its part.
pub fn upload_part(
    rt: &Rt,
    out: &Store,
    s: usize,
    bytes: Bytes,
    id: &PartIdentity,
) -> Result<PartRecord> {
    let key = part_key(s);
    let sha = sha256_hex(&bytes);
    let len = bytes.len() as u64;
    block_on(rt, out.delete(&record_key(s)))??;
    let mut last = String::new();
    for attempt in 1..=2 {
        block_on(rt, out.put(&key, bytes.clone()))??;
        let back = block_on(rt, out.get(&key))??;
        let got = sha256_hex(&back);
        if got == sha {
            let rec = PartRecord {
                format: PART_FORMAT.into(),
                shard: s,
                path: key,
                n_cells: id.n_cells,
                bytes: len,
                sha256: sha,
                model_sha256: id.model_sha256.clone(),
                shard_sha256: id.shard_sha256.clone(),
                key: id.key.clone(),
                dim: id.dim,
            };
            let json = serde_json::to_vec_pretty(&rec).expect("record serializes");
            block_on(rt, out.put(&record_key(s), Bytes::from(json)))??;
            return Ok(rec);
        }
        last = format!("read back sha256 {got} ({} bytes)", back.len());
        tracing::warn!(part = %out.url_of(&key), attempt, got = %last, "uploaded part failed verification");
    }
    Err(WorkerError::Common(scfm_common::Error::Corrupt {
        url: out.url_of(&key),
        message: format!("{last}, but {len} bytes with sha256 {sha} were written"),
    }))
}

/// The index when every shard's part is present: its record matches `ids[s]` and the
/// stored object has the recorded size (parts this process verified are in `checked`;
/// each worker verified its own parts' bytes). `Err(missing)` lists the shards without one.
pub fn collect_parts(
    rt: &Rt,
    out: &Store,
    ids: &[PartIdentity],
    checked: &[bool],
) -> Result<std::result::Result<Vec<IndexPart>, Vec<usize>>> {
    let (mut parts, mut missing) = (Vec::new(), Vec::new());
    for (s, id) in ids.iter().enumerate() {
        let rec = read_record(rt, out, s)?.filter(|r| r.matches(id));
        let ok = match &rec {
            None => false,
            Some(_) if checked.get(s).copied().unwrap_or(false) => true,
            Some(r) => {
                block_on(rt, out.get_tail_opt(&r.path, 1))??.is_some_and(|t| t.size == r.bytes)
            }
        };
        match rec {
            Some(r) if ok => parts.push(IndexPart {
                shard: s,
                path: r.path,
                n_cells: r.n_cells,
                bytes: r.bytes,
                sha256: r.sha256,
            }),
            _ => missing.push(s),
        }
    }
    Ok(if missing.is_empty() {
        Ok(parts)
    } else {
        Err(missing)
    })
}

/// Writes `index.json` (the same bytes whoever writes it).
pub fn write_index(rt: &Rt, out: &Store, index: &EmbeddingIndex) -> Result<()> {
    let json = serde_json::to_vec_pretty(index).expect("index serializes");
    block_on(rt, out.put(INDEX_JSON, Bytes::from(json)))??;
    Ok(())
}

/// Reads `index.json`, if present and well-formed.
pub fn read_index(rt: &Rt, out: &Store) -> Result<Option<EmbeddingIndex>> {
    let Some(b) = block_on(rt, out.get_opt(INDEX_JSON))?? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice(&b).ok())
}
