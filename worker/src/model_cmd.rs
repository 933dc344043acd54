//! The model commands of `scfm-worker`: `train`, `join`, `embed`, `embed-shards`,
//! `evaluate`, `export` and `tokens`: their arguments and what each runs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use scfm_common::config::TrainSpec;
use scfm_worker::trainer::{RunOptions, Trainer};
use scfm_worker::{Control, Rt};

/// Arguments of `train`.
#[derive(clap::Args)]
pub(crate) struct TrainCli {
    /// Training file (YAML).
    #[arg(long)]
    config: PathBuf,
    /// Continue from the newest checkpoint that verifies.
    #[arg(long, conflicts_with = "fresh")]
    resume: bool,
    /// Discard the checkpoints at checkpoint.url first (start over).
    #[arg(long)]
    fresh: bool,
    /// Stop after this many steps in this process (the schedule still spans the run).
    #[arg(long)]
    stop_after: Option<u64>,
    /// Print one JSON line per step and a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

/// Arguments of `join`.
#[derive(clap::Args)]
pub(crate) struct JoinCli {
    /// Coordinator URL, e.g. http://10.0.0.1:7000.
    #[arg(long)]
    coordinator: String,
    /// Shared token (default: $SCFM_TOKEN).
    #[arg(long, env = "SCFM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Host to bind the ring socket on; peers must reach it there.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// CA certificate to verify a TLS coordinator.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Server name in the coordinator's certificate.
    #[arg(long)]
    tls_domain: Option<String>,
    /// Certificate chain (PEM) this worker presents on its ring connections when the
    /// job runs its ring over TLS (auth.tls.ring): the job's auth.tls.cert.
    #[arg(long)]
    ring_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --ring-tls-cert: the job's auth.tls.key.
    #[arg(long)]
    ring_tls_key: Option<PathBuf>,
}

/// Arguments of `export`.
#[derive(clap::Args)]
pub(crate) struct ExportCli {
    /// A run's checkpoint URL or directory, or one `ckpt-*` directory.
    model: String,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// An evaluation.md (from `evaluate --out`) for the model card.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// The model's vocabulary (vocab.tsv) for checkpoints written without one.
    #[arg(long)]
    vocab: Option<PathBuf>,
}

/// Arguments of `tokens`.
#[derive(clap::Args)]
pub(crate) struct TokensCli {
    /// A run's checkpoint URL or directory, one `ckpt-*` directory, or an export folder.
    model: String,
    /// Cells, as for `embed`.
    input: String,
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
    /// Counts of an .h5ad input from this layer instead of X.
    #[arg(long, conflicts_with = "raw")]
    layer: Option<String>,
    /// Counts of an .h5ad input from raw/X.
    #[arg(long)]
    raw: bool,
}

/// How a model runs over an input: shared by `embed` and `evaluate`.
#[derive(clap::Args)]
pub(crate) struct ModelRunArgs {
    /// Cells per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    device: String,
    /// Counts of an .h5ad input from this layer instead of X.
    #[arg(long, conflicts_with = "raw")]
    layer: Option<String>,
    /// Counts of an .h5ad input from raw/X.
    #[arg(long)]
    raw: bool,
    /// A CSV/TSV input is genes x cells (a header row of cell names, one gene per line).
    #[arg(long)]
    transpose: bool,
    /// The model's vocabulary (vocab.tsv) for checkpoints written without one.
    #[arg(long)]
    vocab: Option<PathBuf>,
    /// Intra-op CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The cell embedding: pooled (the pooled vector as it is) or decoder_metric (it in the
    /// GEPC decoder's metric); default: the model's `embedding` setting.
    #[arg(long, value_parser = ["pooled", "decoder_metric"])]
    embedding: Option<String>,
    /// With decoder_metric: how far its metric goes from the pooled vector's (0) to the
    /// decoder's (1); default: the model's `metric_weight` (absent: 1).
    #[arg(long)]
    metric_weight: Option<f64>,
}

impl ModelRunArgs {
    /// The `--embedding` choice.
    fn embedding(&self) -> Option<scfm_common::config::CellEmbedding> {
        use scfm_common::config::CellEmbedding;
        self.embedding.as_deref().map(|e| match e {
            "decoder_metric" => CellEmbedding::DecoderMetric,
            _ => CellEmbedding::Pooled,
        })
    }

    /// Applies `--threads`.
    fn set_threads(&self) {
        if let Some(t) = self.threads {
            tch::set_num_threads(t as i32);
        }
    }
}

/// Arguments of `embed`.
#[derive(clap::Args)]
pub(crate) struct EmbedCli {
    /// A run's checkpoint URL or directory (the newest verified checkpoint), one
    /// `ckpt-*` directory, or an export folder (`scfm export`).
    model: String,
    /// Cells to embed: .h5ad, 10x .h5 or mtx folder, .loom, CSV/TSV, or a prepared dataset.
    input: String,
    /// Output .h5ad (the input's obs and var, obsm[KEY], uns['scfm']).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    run: ModelRunArgs,
    /// obsm key of the embedding.
    #[arg(long, default_value = "X_scfm")]
    key: String,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Arguments of `embed-shards`.
#[derive(clap::Args)]
pub(crate) struct EmbedShardsCli {
    /// A run's checkpoint URL or directory, one `ckpt-*` directory, or an export folder.
    model: String,
    /// The prepared dataset (`scfm prepare`): a directory or an object-store URL.
    dataset: String,
    /// Output directory or URL (parts/part-NNNNNN.h5ad, parts/part-NNNNNN.json, index.json).
    #[arg(long)]
    out: String,
    /// This worker's rank (0..WORLD).
    #[arg(long)]
    rank: usize,
    /// Number of workers.
    #[arg(long)]
    world: usize,
    /// Cells per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    device: String,
    /// obsm key of the embedding.
    #[arg(long, default_value = "X_scfm")]
    key: String,
    /// The model's vocabulary (vocab.tsv) for checkpoints written without one.
    #[arg(long)]
    vocab: Option<PathBuf>,
    /// Where shards of a remote dataset are cached (default: $TMPDIR/scfm-cache).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Intra-op CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Arguments of `evaluate`.
#[derive(clap::Args)]
pub(crate) struct EvaluateCli {
    /// A run's checkpoint URL or directory, one `ckpt-*` directory, or an export folder.
    model: String,
    /// Labelled cells with raw counts (.h5ad).
    data: String,
    /// obs column of the cell-type labels.
    #[arg(long)]
    label_key: String,
    /// obs column of the batches (adds batch ASW and graph connectivity).
    #[arg(long)]
    batch_key: Option<String>,
    /// Directory for evaluation.json and evaluation.md.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: ModelRunArgs,
    /// Seed of the folds, clusterings, masks and the random model.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Highly variable genes of the PCA baseline.
    #[arg(long, default_value_t = 2000)]
    n_hvg: usize,
    /// HVG flavor of the PCA baseline: seurat_v3 (counts) or seurat (log data).
    #[arg(long, default_value = "seurat_v3", value_parser = ["seurat_v3", "seurat"])]
    hvg_flavor: String,
    /// Principal components of the PCA baseline.
    #[arg(long, default_value_t = 50)]
    n_pcs: usize,
    /// k-means runs per embedding, each the best of 10 restarts; the k-means scores are
    /// their mean. One run's ARI can move by 0.3 (k = the number of labels), so comparing
    /// two models wants many; default: 250,000 / cells, within 5..=100 (100 up to
    /// 2,500 cells).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    kmeans_runs: Option<u64>,
    /// Fold assignments of the kNN classifier (5-fold stratified each; seeds `--seed`,
    /// `--seed` + 1, …); the kNN scores are their mean. Default: 25,000 / cells, within
    /// 1..=10 (10 up to 2,500 cells).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
    knn_repeats: Option<u64>,
    /// Print the evaluation as JSON on stdout instead of markdown.
    #[arg(long)]
    json: bool,
}

/// The device choice of a `--device` flag.
pub(crate) fn device_choice(s: &str) -> scfm_common::config::Device {
    match s {
        "cpu" => scfm_common::config::Device::Cpu,
        "cuda" => scfm_common::config::Device::Cuda,
        _ => scfm_common::config::Device::Auto,
    }
}

/// The matrix chosen by `--layer` / `--raw`.
pub(crate) fn matrix_source(
    layer: Option<String>,
    raw: bool,
) -> scfm_common::data::h5ad::MatrixSource {
    use scfm_common::data::h5ad::MatrixSource;
    match (layer, raw) {
        (Some(l), _) => MatrixSource::Layer(l),
        (None, true) => MatrixSource::Raw,
        (None, false) => MatrixSource::X,
    }
}

/// `train`: a run of a training file in this process, then its summary on stderr (and as
/// JSON with `--json`).
pub(crate) fn train(a: TrainCli, rt: &Rt, control: &Control) -> Result<()> {
    let TrainCli {
        config,
        resume,
        fresh,
        stop_after,
        json,
    } = a;
    let spec = TrainSpec::load(&config).with_context(|| format!("loading {}", config.display()))?;
    control.install_signal_handlers()?;
    let opts = RunOptions {
        resume,
        fresh,
        stop_after,
        json,
        ..RunOptions::default()
    };
    let mut trainer = Trainer::with_runtime(spec, &opts, rt, control)?;
    let summary = trainer.run(&opts)?;
    let s = serde_json::to_value(&summary)?;
    if json {
        println!("{}", serde_json::json!({"event": "done", "summary": s}));
    }
    if summary.preempted {
        eprintln!(
            "preempted at step {}: checkpoint saved; run again with --resume to continue",
            summary.steps
        );
    }
    eprintln!(
        "done: {} steps ({} in this run) in {:.1} s; MGEM loss {:.4} -> {:.4}; best validation loss {}; data wait {:.1}%; checkpoints in {}",
        summary.steps,
        summary.steps_this_run,
        summary.seconds,
        summary.first_mgem.unwrap_or(f64::NAN),
        summary.last_mgem,
        summary.best_val.map_or("-".into(), |v| format!("{v:.4}")),
        100.0 * summary.data_wait_fraction,
        summary.checkpoint
    );
    Ok(())
}

/// `join`: this process as one worker of a cluster job until the job ends.
pub(crate) fn join(a: JoinCli, rt: &Rt, control: &Control) -> Result<()> {
    let JoinCli {
        coordinator,
        token,
        bind,
        tls_ca,
        tls_domain,
        ring_tls_cert,
        ring_tls_key,
    } = a;
    control.install_signal_handlers()?;
    let args = scfm_worker::dist::JoinArgs {
        coordinator,
        token,
        bind,
        tls_ca,
        tls_domain,
        ring_tls_cert,
        ring_tls_key,
    };
    match scfm_worker::dist::join(&args, rt, control)? {
        Some(s) => eprintln!(
            "worker done: {} steps, last MGEM loss {:.4}, parameter fingerprint {}",
            s.steps, s.last_mgem, s.fingerprint
        ),
        None => eprintln!("the job is over: nothing (more) to do"),
    }
    Ok(())
}

/// `embed`: a model's cell embeddings of an input, written into a new .h5ad.
pub(crate) fn embed(e: EmbedCli, rt: &Rt) -> Result<()> {
    e.run.set_threads();
    let embedding = e.run.embedding();
    let args = scfm_worker::infer::run::EmbedArgs {
        model: e.model,
        input: e.input,
        out: e.out,
        batch_size: e.run.batch_size,
        device: device_choice(&e.run.device),
        source: matrix_source(e.run.layer, e.run.raw),
        transpose: e.run.transpose,
        vocab: e.run.vocab,
        key: e.key,
        cache_dir: None,
        progress: true,
        embedding,
        metric_weight: e.run.metric_weight,
    };
    let s = scfm_worker::infer::run::run_embed(&args, rt)?;
    if e.json {
        println!("{}", serde_json::to_string(&s)?);
    }
    eprintln!(
        "embedded {} cells ({} dims) in {:.1} s ({:.0} cells/s) -> {}",
        s.cells, s.dim, s.seconds, s.cells_per_s, s.out
    );
    Ok(())
}

/// `embed-shards`: this worker's share of the shards of a distributed embedding.
pub(crate) fn embed_shards(e: EmbedShardsCli, rt: &Rt, control: &Control) -> Result<()> {
    if let Some(t) = e.threads {
        tch::set_num_threads(t as i32);
    }
    control.install_signal_handlers()?;
    let args = scfm_worker::infer::shards::ShardsArgs {
        model: e.model,
        dataset: e.dataset,
        out: e.out,
        rank: e.rank,
        world: e.world,
        batch_size: e.batch_size,
        device: device_choice(&e.device),
        key: e.key,
        vocab: e.vocab,
        cache_dir: e.cache_dir,
    };
    let s = scfm_worker::infer::shards::run_embed_shards(&args, rt, control)?;
    if e.json {
        println!("{}", serde_json::to_string(&s)?);
    }
    let what = format!(
        "rank {}: {} parts embedded ({} cells), {} verified parts kept in {:.1} s",
        s.rank,
        s.embedded.len(),
        s.cells,
        s.skipped.len(),
        s.seconds
    );
    match (&s.index, s.preempted) {
        (_, true) => eprintln!("{what}; preempted: run again to resume"),
        (Some(i), _) => eprintln!("{what}; all {} parts done: {i}", s.n_shards),
        (None, _) => eprintln!(
            "{what}; {} parts of other workers not done yet (the last worker writes index.json)",
            s.missing.len()
        ),
    }
    Ok(())
}

/// `evaluate`: a model's embedding scored beside PCA and the random-init model.
pub(crate) fn evaluate(e: EvaluateCli, rt: &Rt) -> Result<()> {
    use scfm_worker::infer::evaluate::{EvaluateArgs, markdown, run_evaluate};
    use scfm_worker::infer::pca::{HvgFlavor, PcaSettings};
    e.run.set_threads();
    let embedding = e.run.embedding();
    let args = EvaluateArgs {
        model: e.model,
        data: e.data,
        label_key: e.label_key,
        batch_key: e.batch_key,
        out: e.out,
        batch_size: e.run.batch_size,
        device: device_choice(&e.run.device),
        source: matrix_source(e.run.layer, e.run.raw),
        transpose: e.run.transpose,
        vocab: e.run.vocab,
        seed: e.seed,
        pca: PcaSettings {
            n_hvg: e.n_hvg,
            flavor: if e.hvg_flavor == "seurat" {
                HvgFlavor::Seurat
            } else {
                HvgFlavor::SeuratV3
            },
            n_pcs: e.n_pcs,
        },
        kmeans_runs: e.kmeans_runs.map(|r| r as usize),
        knn_repeats: e.knn_repeats.map(|r| r as usize),
        embedding,
        metric_weight: e.run.metric_weight,
    };
    let ev = run_evaluate(&args, rt)?;
    if e.json {
        println!("{}", serde_json::to_string_pretty(&ev)?);
    } else {
        print!("{}", markdown(&ev));
    }
    Ok(())
}

/// `export`: a checkpoint as a folder PyTorch loads.
pub(crate) fn export(a: ExportCli, rt: &Rt) -> Result<()> {
    let ExportCli {
        model,
        out,
        eval,
        vocab,
    } = a;
    let c = scfm_worker::infer::export::run_export(
        &model,
        &out,
        eval.as_deref(),
        vocab.as_deref(),
        rt,
    )?;
    eprintln!(
        "exported {} (step {}, {} genes) to {}",
        c.source,
        c.step,
        c.n_genes,
        out.display()
    );
    Ok(())
}

/// `tokens`: the padded inference tokens of an input, as safetensors.
pub(crate) fn tokens(a: TokensCli, rt: &Rt) -> Result<()> {
    let TokensCli {
        model,
        input,
        out,
        layer,
        raw,
    } = a;
    let n =
        scfm_worker::infer::dump::run_tokens(&model, &input, matrix_source(layer, raw), &out, rt)?;
    eprintln!("wrote the tokens of {n} cells to {}", out.display());
    Ok(())
}
