//! `scfm embed MODEL INPUT --out OUT.h5ad`: the input's cells encoded by the model,
//! written with the input's `obs` and `var` into a new `.h5ad` (`obsm[key]`, `uns['scfm']`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use scfm_common::config::{CellEmbedding, Device as DeviceChoice};
use scfm_common::data::h5ad::MatrixSource;
use scfm_common::data::h5ad::embedding::{EmbeddingWriter, Frame, UnsValue};
use scfm_common::runtime::Rt;
use serde::Serialize;

use super::align::{GeneAlignment, align};
use super::embed::Embedder;
use super::input::{BLOCK_ROWS, CellInput, InputOptions};
use super::load::ModelBundle;
use crate::error::{Result, WorkerError};
use crate::step::select_device;

/// Below this fraction of the model's genes found in the input, `embed` warns.
pub const LOW_MATCH_WARNING: f64 = 0.5;

/// What `scfm embed` was asked to do.
#[derive(Debug, Clone)]
pub struct EmbedArgs {
    /// Checkpoint URL / directory or export folder.
    pub model: String,
    /// Input file or prepared dataset.
    pub input: String,
    /// Output `.h5ad`.
    pub out: PathBuf,
    /// Cells per forward pass.
    pub batch_size: usize,
    /// Device.
    pub device: DeviceChoice,
    /// Matrix of an `.h5ad` input holding the counts.
    pub source: MatrixSource,
    /// A CSV/TSV input is genes × cells.
    pub transpose: bool,
    /// Vocabulary file for checkpoints that lack one.
    pub vocab: Option<PathBuf>,
    /// `obsm` key.
    pub key: String,
    /// Where remote shards are cached.
    pub cache_dir: Option<PathBuf>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// The cell embedding, when not the model's own setting (`--embedding`).
    pub embedding: Option<CellEmbedding>,
    /// The decoder metric's weight, when not the model's own `metric_weight`
    /// (`--metric-weight`).
    pub metric_weight: Option<f64>,
}

/// What `scfm embed` did.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedSummary {
    /// Cells embedded.
    pub cells: usize,
    /// Embedding width.
    pub dim: usize,
    /// Model genes found in the input.
    pub genes_matched: usize,
    /// Genes of the model.
    pub model_genes: usize,
    /// Matched by gene id or symbol.
    pub matched_by: String,
    /// Cells with none of the model's genes: their embedding carries no information (all
    /// zeros with mean pooling, the `[CLS]` token alone with `cls` pooling).
    pub cells_without_genes: usize,
    /// Seconds.
    pub seconds: f64,
    /// Cells per second.
    pub cells_per_s: f64,
    /// The output file.
    pub out: String,
}

/// Aligns the input's genes to the model: an error when none match, a warning under
/// [`LOW_MATCH_WARNING`].
pub fn check_alignment(input: &CellInput, bundle: &ModelBundle) -> Result<GeneAlignment> {
    let a = align(&input.var_names, &bundle.vocab);
    if a.matched == 0 {
        let sample: Vec<&String> = input.var_names.iter().take(3).collect();
        let vsample: Vec<&String> = bundle.vocab.iter().take(3).map(|e| &e.gene_id).collect();
        return Err(WorkerError::Data(format!(
            "{}: none of its {} genes (e.g. {sample:?}) is in the model's vocabulary of {} genes (e.g. {vsample:?}); the model cannot embed these cells",
            input.describe,
            input.var_names.len(),
            bundle.vocab.len()
        )));
    }
    eprintln!(
        "genes: {} of the model's {} found in the input ({:.1}%, matched by {})",
        a.matched,
        a.n_model,
        100.0 * a.fraction(),
        a.by
    );
    if a.fraction() < LOW_MATCH_WARNING {
        tracing::warn!(
            matched = a.matched,
            model_genes = a.n_model,
            "only {:.1}% of the model's genes are in the input; embeddings may be poor",
            100.0 * a.fraction()
        );
    }
    Ok(a)
}

/// A progress bar on a terminal (hidden otherwise).
pub fn progress_bar(n: usize, show: bool) -> indicatif::ProgressBar {
    if !show || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(n as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} cells, {per_sec}, ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

/// Runs `scfm embed` (its storage calls on `rt`).
pub fn run_embed(args: &EmbedArgs, rt: &Rt) -> Result<EmbedSummary> {
    let t0 = Instant::now();
    let device = select_device(args.device)?;
    let mut bundle = ModelBundle::load(&args.model, device, args.vocab.as_deref(), rt)?;
    bundle.set_read_out(args.embedding, args.metric_weight)?;
    let input = CellInput::open(
        &args.input,
        &InputOptions {
            source: args.source.clone(),
            cache_dir: args.cache_dir.clone(),
            transpose: args.transpose,
            ..InputOptions::default()
        },
        rt,
    )?;
    eprintln!(
        "model: {} (step {}, {} embedding, {} genes); input: {}",
        bundle.origin,
        bundle.step,
        embedding_name(&bundle),
        bundle.vocab.len(),
        input.describe
    );
    let a = check_alignment(&input, &bundle)?;
    let emb = Embedder::new(&bundle, args.batch_size);
    let n = input.n_cells();
    // The input's var dataframe travels along when it describes these columns (not for
    // `raw/X`, whose genes are `raw/var`'s).
    let var = match &input.obs_frame {
        Frame::CopyFrom(p)
            if args.source != MatrixSource::Raw
                && scfm_common::data::h5ad::embedding::has_modern_frame(p, "var") =>
        {
            Frame::CopyFrom(p.clone())
        }
        _ => Frame::Index(input.var_names.clone()),
    };
    // Like `evaluate --out` and `export --out`, a missing folder of the output is made.
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| WorkerError::Data(format!("{}: {e}", parent.display())))?;
    }
    let mut w =
        EmbeddingWriter::create(&args.out, &input.obs_frame, n, &var, &args.key, emb.dim())?;
    let pb = progress_bar(n, args.progress);
    pb.set_message("embedding");
    let mut empty = 0;
    input.for_each_block(BLOCK_ROWS, |first, counts| {
        let x = emb.model_rows(&counts, &a);
        empty += (0..x.n_rows)
            .filter(|&r| x.indptr[r + 1] == x.indptr[r])
            .count();
        for (k, part) in (0..x.n_rows)
            .collect::<Vec<_>>()
            .chunks(args.batch_size.max(1))
            .enumerate()
        {
            let sub = x.select_rows(part);
            let rows = emb.embed(&sub)?;
            w.write_rows(first + k * args.batch_size.max(1), &rows)?;
            pb.inc(part.len() as u64);
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    if empty > 0 {
        tracing::warn!(
            cells = empty,
            "cells with none of the model's genes: their embedding carries no information (zeros with mean pooling, [CLS] alone with cls pooling)"
        );
    }
    let uns = [
        ("model", UnsValue::Str(bundle.origin.clone())),
        ("model_sha256", UnsValue::Str(bundle.digest.clone())),
        ("step", UnsValue::Int(bundle.step as i64)),
        ("hidden", UnsValue::Int(bundle.cfg().hidden as i64)),
        (
            "embedding_dim",
            UnsValue::Int(bundle.cfg().cell_dim() as i64),
        ),
        ("n_layers", UnsValue::Int(bundle.cfg().n_layers as i64)),
        ("embedding", UnsValue::Str(embedding_name(&bundle))),
        ("normalized", UnsValue::Str("none".into())),
        ("genes_matched", UnsValue::Int(a.matched as i64)),
        ("model_genes", UnsValue::Int(a.n_model as i64)),
        ("matched_by", UnsValue::Str(a.by.into())),
        (
            "scfm_version",
            UnsValue::Str(env!("CARGO_PKG_VERSION").into()),
        ),
    ];
    w.finish("scfm", &uns)?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(EmbedSummary {
        cells: n,
        dim: emb.dim(),
        genes_matched: a.matched,
        model_genes: a.n_model,
        matched_by: a.by.into(),
        cells_without_genes: empty,
        seconds,
        cells_per_s: n as f64 / seconds.max(1e-9),
        out: args.out.display().to_string(),
    })
}

/// The cell embedding's name: its pooling (`cls` or `mean`), with `+decoder_metric` when
/// it is read in the GEPC decoder's metric (`model.embedding`), `+decoder_metric(w)` when
/// its `metric_weight` `w` is not 1.
pub fn embedding_name(b: &ModelBundle) -> String {
    let pooling = match b.cfg().pooling {
        scfm_common::config::Pooling::Cls => "cls",
        scfm_common::config::Pooling::Mean => "mean",
    };
    match b.cfg().read_out() {
        CellEmbedding::Pooled => pooling.to_string(),
        e if b.cfg().metric_weight == scfm_common::config::DEFAULT_METRIC_WEIGHT => {
            format!("{pooling}+{}", e.name())
        }
        e => format!("{pooling}+{}({})", e.name(), b.cfg().metric_weight),
    }
}
