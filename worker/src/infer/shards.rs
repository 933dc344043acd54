//! `scfm-worker embed-shards MODEL DATASET --out URL --rank R --world W`: one worker's
//! share of a distributed embedding of a prepared dataset. Worker `R` embeds the shards
//! `s` with `s % W == R`, in order, into one part each (see [`super::parts`]); a part whose
//! record matches this model and shard and whose bytes have the recorded SHA-256 is
//! skipped, so a rerun (with any `W`) redoes only what is missing or damaged. SIGTERM or
//! SIGINT stops the worker after the part it is writing. The worker that finds every part
//! present at its end writes `index.json`.
//!
//! A part holds exactly the rows `scfm embed MODEL DATASET` computes for the shard's cells
//! (same blocks and batches), so the parts in order equal the one-process embedding.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use scfm_common::config::Device as DeviceChoice;
use scfm_common::data::h5ad::MatrixSource;
use scfm_common::data::h5ad::embedding::{EmbeddingWriter, Frame, UnsValue};
use scfm_common::data::h5ad::rows::{H5adRows, read_obs_names};
use scfm_common::data::prepared::PreparedDataset;
use scfm_common::data::preprocess::check_counts_at;
use scfm_common::runtime::Rt;
use scfm_common::storage::Store;
use serde::Serialize;

use super::align::{GeneAlignment, align};
use super::embed::Embedder;
use super::input::BLOCK_ROWS;
use super::load::ModelBundle;
use super::parts::{self, EmbeddingIndex, INDEX_FORMAT, INDEX_JSON, PartIdentity};
use super::run::embedding_name;
use crate::control::Control;
use crate::data::cache::ShardCache;
use crate::error::{Result, WorkerError};
use crate::step::select_device;

/// What one worker of a distributed embedding was asked to do.
#[derive(Debug, Clone)]
pub struct ShardsArgs {
    /// Checkpoint URL / directory or export folder.
    pub model: String,
    /// The prepared dataset's URL.
    pub dataset: String,
    /// Output URL (parts and index).
    pub out: String,
    /// This worker's rank.
    pub rank: usize,
    /// Number of workers.
    pub world: usize,
    /// Cells per forward pass.
    pub batch_size: usize,
    /// Device.
    pub device: DeviceChoice,
    /// `obsm` key.
    pub key: String,
    /// Vocabulary file for checkpoints that lack one.
    pub vocab: Option<PathBuf>,
    /// Where remote shards are cached.
    pub cache_dir: Option<PathBuf>,
}

/// What one worker did.
#[derive(Debug, Clone, Serialize)]
pub struct ShardsSummary {
    /// This worker's rank.
    pub rank: usize,
    /// Number of workers.
    pub world: usize,
    /// Shards of the dataset.
    pub n_shards: usize,
    /// Shards embedded by this run.
    pub embedded: Vec<usize>,
    /// Shards whose verified part was kept.
    pub skipped: Vec<usize>,
    /// Cells embedded by this run.
    pub cells: usize,
    /// Stopped by SIGTERM/SIGINT before its last shard.
    pub preempted: bool,
    /// Shards still without a part when this worker finished (other workers' share).
    pub missing: Vec<usize>,
    /// `index.json`'s URL when this worker wrote it.
    pub index: Option<String>,
    /// Seconds.
    pub seconds: f64,
}

/// Everything the parts of one run share.
struct Job<'a> {
    ds: &'a PreparedDataset,
    bundle: &'a ModelBundle,
    align: GeneAlignment,
    var_names: Vec<String>,
    out: Store,
    args: &'a ShardsArgs,
    tmp: PathBuf,
    /// One embedder for every shard (its read-out matrix is computed once per job).
    emb: Embedder<'a>,
}

impl Job<'_> {
    fn identity(&self, s: usize) -> PartIdentity {
        let info = &self.ds.manifest.shards[s];
        PartIdentity {
            model_sha256: self.bundle.digest.clone(),
            shard_sha256: info.sha256.clone(),
            key: self.args.key.clone(),
            dim: self.bundle.cfg().cell_dim(),
            n_cells: info.n_cells,
        }
    }

    /// Embeds shard `s` (a verified local file) into a local part file; returns its bytes.
    fn embed_shard(&self, s: usize, shard: &Path) -> Result<Bytes> {
        let data_err = |m: String| WorkerError::Data(format!("{}: {m}", shard.display()));
        let obs_names = read_obs_names(shard)?;
        let rows = H5adRows::open(shard, &MatrixSource::X)?
            .ok_or_else(|| data_err("X is not a CSR matrix".into()))?;
        let n = rows.n_rows();
        if obs_names.len() != n || n != self.ds.manifest.shards[s].n_cells {
            return Err(data_err(format!(
                "{} obs names and {n} rows, dataset.json lists {} cells",
                obs_names.len(),
                self.ds.manifest.shards[s].n_cells
            )));
        }
        let emb = &self.emb;
        let file = self.tmp.join(format!("part-{s:06}.h5ad"));
        let mut w = EmbeddingWriter::create(
            &file,
            &Frame::Index(obs_names),
            n,
            &Frame::Index(self.var_names.clone()),
            &self.args.key,
            emb.dim(),
        )?;
        // The blocks and batches of `run_embed` on the same shard: the same rows, bit for bit.
        let bs = self.args.batch_size.max(1);
        for a in (0..n).step_by(BLOCK_ROWS) {
            let b = (a + BLOCK_ROWS).min(n);
            let counts = rows.read(a, b)?;
            check_counts_at(&counts, shard, &self.var_names, false, a)?;
            let x = emb.model_rows(&counts, &self.align);
            let all: Vec<usize> = (0..x.n_rows).collect();
            for (k, batch) in all.chunks(bs).enumerate() {
                let e = emb.embed(&x.select_rows(batch))?;
                w.write_rows(a + k * bs, &e)?;
            }
        }
        let b = self.bundle;
        let a = &self.align;
        let uns = [
            ("model", UnsValue::Str(b.origin.clone())),
            ("model_sha256", UnsValue::Str(b.digest.clone())),
            ("step", UnsValue::Int(b.step as i64)),
            ("hidden", UnsValue::Int(b.cfg().hidden as i64)),
            ("embedding_dim", UnsValue::Int(b.cfg().cell_dim() as i64)),
            ("n_layers", UnsValue::Int(b.cfg().n_layers as i64)),
            ("embedding", UnsValue::Str(embedding_name(b))),
            ("normalized", UnsValue::Str("none".into())),
            ("genes_matched", UnsValue::Int(a.matched as i64)),
            ("model_genes", UnsValue::Int(a.n_model as i64)),
            ("matched_by", UnsValue::Str(a.by.into())),
            ("shard", UnsValue::Int(s as i64)),
            (
                "shard_sha256",
                UnsValue::Str(self.ds.manifest.shards[s].sha256.clone()),
            ),
            (
                "scfm_version",
                UnsValue::Str(env!("CARGO_PKG_VERSION").into()),
            ),
        ];
        w.finish("scfm", &uns)?;
        let bytes = std::fs::read(&file).map_err(|e| data_err(format!("{}: {e}", file.display())));
        let _ = std::fs::remove_file(&file);
        Ok(Bytes::from(bytes?))
    }
}

/// Runs one worker's share, its storage calls on `rt`; a worker asked to stop (`control`)
/// returns after the part under way with `preempted` set.
pub fn run_embed_shards(args: &ShardsArgs, rt: &Rt, control: &Control) -> Result<ShardsSummary> {
    let t0 = Instant::now();
    if args.world == 0 || args.rank >= args.world {
        return Err(WorkerError::Data(format!(
            "--rank {} must be below --world {}",
            args.rank, args.world
        )));
    }
    let ds = parts::block_on(rt, PreparedDataset::open(&args.dataset))??;
    let out = Store::open(&args.out)?;
    let bundle = ModelBundle::load(
        &args.model,
        select_device(args.device)?,
        args.vocab.as_deref(),
        rt,
    )?;
    let var_names: Vec<String> = ds.vocab.iter().map(|e| e.gene_id.clone()).collect();
    let al = align(&var_names, &bundle.vocab);
    if al.matched == 0 {
        return Err(WorkerError::Data(format!(
            "{}: none of its {} genes is in the model's vocabulary of {} genes; the model cannot embed these cells",
            ds.store.url(),
            var_names.len(),
            bundle.vocab.len()
        )));
    }
    let n_shards = ds.manifest.shards.len();
    let mine: Vec<usize> = (0..n_shards)
        .filter(|s| s % args.world == args.rank)
        .collect();
    eprintln!(
        "rank {}/{}: model {} (step {}); {} of {} shards of {} ({} of the model's {} genes) -> {}",
        args.rank,
        args.world,
        bundle.origin,
        bundle.step,
        mine.len(),
        n_shards,
        ds.store.url(),
        al.matched,
        al.n_model,
        out.url()
    );
    let tmp = tempfile::Builder::new()
        .prefix("scfm-parts-")
        .tempdir()
        .map_err(|e| WorkerError::Data(format!("temporary directory: {e}")))?;
    let job = Job {
        ds: &ds,
        bundle: &bundle,
        align: al,
        var_names,
        out,
        args,
        tmp: tmp.path().to_path_buf(),
        emb: Embedder::new(&bundle, args.batch_size),
    };
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("scfm-cache"));
    let cache = ShardCache::new(
        ds.store.clone(),
        ds.manifest.shards.clone(),
        &cache_dir,
        rt.clone(),
    );
    let mut s = ShardsSummary {
        rank: args.rank,
        world: args.world,
        n_shards,
        embedded: Vec::new(),
        skipped: Vec::new(),
        cells: 0,
        preempted: false,
        missing: Vec::new(),
        index: None,
        seconds: 0.0,
    };
    let mut checked = vec![false; n_shards];
    for &shard in &mine {
        if control.stop_requested() {
            s.preempted = true;
            break;
        }
        let id = job.identity(shard);
        let url = job.out.url_of(&parts::part_key(shard));
        if parts::part_verified(rt, &job.out, shard, &id)? {
            eprintln!("rank {}: skipping verified part {url}", args.rank);
            s.skipped.push(shard);
        } else {
            let t = Instant::now();
            let local = cache.ensure(shard as u32)?;
            // A complete index must not outlive a part it lists being rewritten.
            parts::block_on(rt, job.out.delete(INDEX_JSON))??;
            let bytes = job.embed_shard(shard, &local)?;
            let rec = parts::upload_part(rt, &job.out, shard, bytes, &id)?;
            eprintln!(
                "rank {}: wrote part {url} ({} cells, {} bytes, {:.1} s)",
                args.rank,
                rec.n_cells,
                rec.bytes,
                t.elapsed().as_secs_f64()
            );
            s.embedded.push(shard);
            s.cells += rec.n_cells;
        }
        checked[shard] = true;
    }
    if !s.preempted {
        let ids: Vec<PartIdentity> = (0..n_shards).map(|i| job.identity(i)).collect();
        match parts::collect_parts(rt, &job.out, &ids, &checked)? {
            Ok(list) => {
                let index = EmbeddingIndex {
                    format: INDEX_FORMAT.into(),
                    version: parts::VERSION,
                    model: bundle.origin.clone(),
                    model_sha256: bundle.digest.clone(),
                    dataset: ds.store.url().to_string(),
                    dataset_identity: ds.manifest.identity(),
                    n_cells: list.iter().map(|p| p.n_cells).sum(),
                    dim: bundle.cfg().cell_dim(),
                    key: args.key.clone(),
                    parts: list,
                };
                parts::write_index(rt, &job.out, &index)?;
                s.index = Some(job.out.url_of(INDEX_JSON));
            }
            Err(missing) => s.missing = missing,
        }
    }
    s.seconds = t0.elapsed().as_secs_f64();
    Ok(s)
}
