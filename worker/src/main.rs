//! `scfm-worker`: trains the model in this process (`train`), exports reference tensors
//! for the PyTorch cross-check (`reference`), benchmarks training steps (`bench`,
//! `bench-step`) and embedding throughput (`bench-embed`), and checks NCCL (`nccl-check`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use scfm_common::config::TrainSpec;
use scfm_worker::trainer::{RunOptions, Trainer};
use scfm_worker::{Control, Rt};

#[derive(Parser)]
#[command(
    name = "scfm-worker",
    version,
    about = "scfm worker: single-cell foundation model training"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train on one machine from a training file (see configs/train-demo.yaml).
    Train {
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
    },
    /// Join a cluster job: register with the coordinator and train this worker's share.
    Join {
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
    },
    /// Training steps/s of scfm vs the same model in PyTorch eager, side by side.
    Bench {
        /// Presets to measure.
        #[arg(long, value_delimiter = ',', default_value = "minimal,default")]
        presets: Vec<String>,
        /// Cells per batch (two views each).
        #[arg(long, default_value_t = 8)]
        cells: usize,
        /// Tokens per sequence (default: the preset's max_seq_len).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Gene vocabulary size.
        #[arg(long, default_value_t = 20_000)]
        genes: usize,
        /// Threads for both sides.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[command(flatten)]
        protocol: ProtocolArgs,
        /// PyTorch baselines: plain (the package's model, default AdamW), tuned (the same
        /// shortcuts as scfm, fused AdamW, SDPA), compiled (tuned under torch.compile).
        #[arg(long, value_delimiter = ',', default_value = "plain,tuned,compiled")]
        baselines: Vec<String>,
        /// Python with torch (default: $SCFM_PYTHON or .venv/bin/python).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Embedding cells/s of scfm vs scfm_torch (PyTorch) on the same cells, weights and
    /// threads, side by side; checks that both compute the same embeddings.
    BenchEmbed {
        /// Presets to measure (random-init weights over the data's genes).
        #[arg(long, value_delimiter = ',', default_value = "minimal,default")]
        presets: Vec<String>,
        /// Raw counts (.h5ad or any input `embed` reads).
        #[arg(long, default_value = "data/pbmc68k_counts.h5ad")]
        data: PathBuf,
        /// Cells per pass: the first N (the data repeated when it has fewer); default all.
        #[arg(long)]
        cells: Option<usize>,
        /// Cells per forward pass (as `embed`).
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Intra-op threads for both sides.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[command(flatten)]
        protocol: ProtocolArgs,
        /// Python with torch and anndata (default: $SCFM_PYTHON or .venv/bin/python).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Device (CPU only).
        #[arg(long, default_value = "cpu", value_parser = ["cpu"])]
        device: String,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Training steps/s, tokens/s and MFU of presets on one device against the matmul peak
    /// measured in the same run, the CPU-vs-device loss agreement on the same weights and
    /// batch, and the host memory high-water mark (the GPU bundle runs it on a GPU).
    BenchStep {
        /// Presets to measure.
        #[arg(long, value_delimiter = ',', default_value = "default,large")]
        presets: Vec<String>,
        /// cpu or cuda.
        #[arg(long, default_value = "cuda", value_parser = ["cpu", "cuda"])]
        device: String,
        /// Encoder compute precision (the matmul peak is measured in the same dtype).
        #[arg(long, default_value = "bf16", value_parser = ["fp32", "bf16"])]
        precision: String,
        /// Cells per step (two views each).
        #[arg(long, default_value_t = 16)]
        cells: usize,
        /// Tokens per sequence (default: the preset's max_seq_len).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Gene vocabulary size.
        #[arg(long, default_value_t = 20_000)]
        genes: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Warm-up steps.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Cells of the loss-agreement batch (also run on the CPU in fp32).
        #[arg(long, default_value_t = 2)]
        agree_cells: usize,
        /// Size of the square matmul that measures the peak.
        #[arg(long, default_value_t = 8192)]
        matmul_n: i64,
        /// Intra-op CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// NCCL on CUDA device 0 with a one-rank communicator: loads the library, forms the
    /// communicator, all-reduces a buffer and checks it (needs `--features nccl` and a GPU).
    NcclCheck {
        /// Buffer size in MiB.
        #[arg(long, default_value_t = 256)]
        mb: usize,
        /// Timed all-reduces.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Ring all-reduce bus bandwidth over loopback next to the loopback TCP bound.
    BenchAllreduce {
        /// World sizes (one thread per rank in this process).
        #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
        world: Vec<usize>,
        /// Buffer sizes in MB.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        mb: Vec<usize>,
        /// Instead, time the ring over TLS against the plain ring (alternated over
        /// --rounds): the certificate chain (PEM) the accepting ranks present.
        #[arg(long, requires_all = ["ring_tls_key", "tls_ca"])]
        ring_tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --ring-tls-cert.
        #[arg(long)]
        ring_tls_key: Option<PathBuf>,
        /// CA certificate (PEM) the connecting ranks verify --ring-tls-cert with.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// Server name in --ring-tls-cert.
        #[arg(long, default_value = "localhost")]
        tls_domain: String,
        /// Rounds of the TLS comparison.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Cell embeddings of a trained model, written into a new .h5ad (obsm['X_scfm']).
    Embed(Box<EmbedCli>),
    /// One worker's share of a distributed embedding of a prepared dataset: shard s goes to
    /// rank s % WORLD, one part per shard in OUT/parts/ (verified parts are kept, so a rerun
    /// resumes); the worker that finds every part done writes OUT/index.json. SIGTERM stops
    /// it after the current part (exit 0). `scfm local embed.yaml` runs one per worker.
    EmbedShards(Box<EmbedShardsCli>),
    /// Score a model's cell embedding beside the PCA baseline and the random-init model.
    Evaluate(Box<EvaluateCli>),
    /// Write a model folder PyTorch loads (config.json, model.safetensors, vocab.tsv, README.md).
    Export {
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
    },
    /// Write the padded inference tokens `embed` feeds the model (genes, bins, values) as
    /// safetensors, for the PyTorch package's equality test.
    #[command(hide = true)]
    Tokens {
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
    },
    /// The libtorch this worker was built against and the one it loaded, CUDA, and where
    /// NCCL is looked for and what loaded (runs even when the libtorch check fails).
    Versions {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a fixed small model, inputs and outputs as safetensors for the PyTorch cross-check.
    Reference {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

/// How a model runs over an input: shared by `embed` and `evaluate`.
/// The benchmark protocol's settings (`scfm_worker::bench_protocol::Protocol`).
#[derive(clap::Args)]
struct ProtocolArgs {
    /// Timed rounds per side (the order of the sides alternates every round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Minimum seconds of one round (whole units of work: steps, passes over the cells).
    #[arg(long, default_value_t = 10.0)]
    round_seconds: f64,
    /// Untimed seconds each side runs first (PyTorch's compile happens here).
    #[arg(long, default_value_t = 10.0)]
    warmup_seconds: f64,
    /// Largest spread, (max - min) / median of a side's rounds, at which a ratio is
    /// printed.
    #[arg(long, default_value_t = 0.25)]
    max_spread: f64,
}

impl ProtocolArgs {
    fn protocol(&self) -> scfm_worker::bench_protocol::Protocol {
        scfm_worker::bench_protocol::Protocol {
            rounds: self.rounds,
            round_s: self.round_seconds,
            warmup_s: self.warmup_seconds,
            max_spread: self.max_spread,
        }
    }
}

#[derive(clap::Args)]
struct ModelRunArgs {
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
struct EmbedCli {
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
struct EmbedShardsCli {
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
struct EvaluateCli {
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
fn device_choice(s: &str) -> scfm_common::config::Device {
    match s {
        "cpu" => scfm_common::config::Device::Cpu,
        "cuda" => scfm_common::config::Device::Cuda,
        _ => scfm_common::config::Device::Auto,
    }
}

/// The matrix chosen by `--layer` / `--raw`.
fn matrix_source(layer: Option<String>, raw: bool) -> scfm_common::data::h5ad::MatrixSource {
    use scfm_common::data::h5ad::MatrixSource;
    match (layer, raw) {
        (Some(l), _) => MatrixSource::Layer(l),
        (None, true) => MatrixSource::Raw,
        (None, false) => MatrixSource::X,
    }
}

/// Exit code of a worker whose job the coordinator ended (or that it dropped).
const EXIT_ENDED: u8 = 3;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(scfm_worker::WorkerError::Ended(reason)) =
                e.downcast_ref::<scfm_worker::WorkerError>()
            {
                eprintln!("worker stopped: {reason}");
                return std::process::ExitCode::from(EXIT_ENDED);
            }
            eprintln!("Error: {e:?}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the command line's subcommand on the process's one tokio runtime.
fn run() -> Result<()> {
    scfm_common::alloc::tune();
    let cli = Cli::parse();
    scfm_common::telemetry::init_logging(&cli.log_format);
    scfm_common::install_crypto_provider();
    if let Cmd::Versions { json } = cli.cmd {
        let v = scfm_worker::versions::report();
        if json {
            println!("{v}");
        } else {
            print!("{}", scfm_worker::versions::text(&v));
        }
        return Ok(());
    }
    // Before anything runs on libtorch: a different libtorch computes wrong results.
    scfm_worker::libtorch::check()?;
    // The one tokio runtime of the process, and what stops its work.
    let rt = Rt::new().context("starting the tokio runtime")?;
    let control = Control::new();
    match cli.cmd {
        Cmd::Train {
            config,
            resume,
            fresh,
            stop_after,
            json,
        } => {
            let spec = TrainSpec::load(&config)
                .with_context(|| format!("loading {}", config.display()))?;
            control.install_signal_handlers()?;
            let opts = RunOptions {
                resume,
                fresh,
                stop_after,
                json,
                ..RunOptions::default()
            };
            let mut trainer = Trainer::with_runtime(spec, &opts, &rt, &control)?;
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
        }
        Cmd::Embed(e) => {
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
            let s = scfm_worker::infer::run::run_embed(&args, &rt)?;
            if e.json {
                println!("{}", serde_json::to_string(&s)?);
            }
            eprintln!(
                "embedded {} cells ({} dims) in {:.1} s ({:.0} cells/s) -> {}",
                s.cells, s.dim, s.seconds, s.cells_per_s, s.out
            );
        }
        Cmd::EmbedShards(e) => {
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
            let s = scfm_worker::infer::shards::run_embed_shards(&args, &rt, &control)?;
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
        }
        Cmd::Evaluate(e) => {
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
            let ev = run_evaluate(&args, &rt)?;
            if e.json {
                println!("{}", serde_json::to_string_pretty(&ev)?);
            } else {
                print!("{}", markdown(&ev));
            }
        }
        Cmd::Export {
            model,
            out,
            eval,
            vocab,
        } => {
            let c = scfm_worker::infer::export::run_export(
                &model,
                &out,
                eval.as_deref(),
                vocab.as_deref(),
                &rt,
            )?;
            eprintln!(
                "exported {} (step {}, {} genes) to {}",
                c.source,
                c.step,
                c.n_genes,
                out.display()
            );
        }
        Cmd::Join {
            coordinator,
            token,
            bind,
            tls_ca,
            tls_domain,
            ring_tls_cert,
            ring_tls_key,
        } => {
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
            match scfm_worker::dist::join(&args, &rt, &control)? {
                Some(s) => eprintln!(
                    "worker done: {} steps, last MGEM loss {:.4}, parameter fingerprint {}",
                    s.steps, s.last_mgem, s.fingerprint
                ),
                None => eprintln!("the job is over: nothing (more) to do"),
            }
        }
        Cmd::Bench {
            presets,
            cells,
            seq_len,
            genes,
            threads,
            protocol,
            baselines,
            python,
            out,
        } => {
            let repo = std::env::current_dir()?;
            let python = bench_python(python, &repo);
            for b in &baselines {
                anyhow::ensure!(
                    ["plain", "tuned", "compiled"].contains(&b.as_str()),
                    "--baselines: unknown baseline {b:?} (plain, tuned, compiled)"
                );
            }
            let args = scfm_worker::bench::BenchArgs {
                presets,
                cells,
                seq_len,
                genes,
                threads,
                protocol: protocol.protocol(),
                baselines,
                python,
                repo,
            };
            let results = scfm_worker::bench::run(&args)?;
            write_json(out.as_deref(), &results)?;
        }
        Cmd::BenchEmbed {
            presets,
            data,
            cells,
            batch_size,
            threads,
            protocol,
            python,
            device: _,
            json,
        } => {
            let repo = std::env::current_dir()?;
            let python = bench_python(python, &repo);
            let args = scfm_worker::bench_embed::EmbedBenchArgs {
                presets,
                data,
                cells,
                batch_size,
                threads,
                protocol: protocol.protocol(),
                python,
                repo,
            };
            let report = scfm_worker::bench_embed::run(&args, &rt)?;
            write_json(json.as_deref(), &report)?;
        }
        Cmd::BenchStep {
            presets,
            device,
            precision,
            cells,
            seq_len,
            genes,
            steps,
            warmup,
            agree_cells,
            matmul_n,
            threads,
            json,
        } => {
            if let Some(t) = threads {
                tch::set_num_threads(t as i32);
            }
            let device = scfm_worker::step::select_device(device_choice(&device))?;
            let args = scfm_worker::bench_device::StepBenchArgs {
                presets,
                device,
                compute: (precision == "bf16").then_some(tch::Kind::BFloat16),
                cells,
                seq_len,
                genes,
                steps,
                warmup,
                agree_cells,
                matmul_n,
            };
            let report = scfm_worker::bench_device::run(&args)?;
            write_json(json.as_deref(), &report)?;
        }
        Cmd::NcclCheck { mb, iters, json } => {
            let r = scfm_worker::collective::nccl_check::run(mb, iters)?;
            println!(
                "nccl-check: {}; {} rank, {} MiB all-reduce: {:.3} ms, algbw {:.1} GB/s, busbw {:.1} GB/s (0 with one rank), values {}",
                r.library,
                r.world,
                r.bytes >> 20,
                r.seconds * 1e3,
                r.algbw_gbs,
                r.busbw_gbs,
                if r.values_ok { "ok" } else { "WRONG" }
            );
            write_json(json.as_deref(), &r)?;
            if !r.values_ok {
                anyhow::bail!("nccl-check: the all-reduce changed the values");
            }
        }
        Cmd::BenchAllreduce {
            world,
            mb,
            ring_tls_cert: Some(cert),
            ring_tls_key: Some(key),
            tls_ca: Some(ca),
            tls_domain,
            rounds,
        } => {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("{}", p.display()));
            let tls = scfm_worker::collective::RingTls::from_pem(
                &read(&cert)?,
                &read(&key)?,
                &read(&ca)?,
                &tls_domain,
            )?;
            bench_tls_cost(&world, &mb, rounds, &tls)?;
        }
        Cmd::BenchAllreduce { world, mb, .. } => {
            let sizes: Vec<usize> = mb.iter().map(|m| m << 20).collect();
            let rows = scfm_worker::collective::bench_bus_bandwidth(&world, &sizes);
            // Two bounds: one socket stream alone, and per stream with W streams at once.
            println!(
                "{:>5} {:>8} {:>10} {:>12} {:>12} {:>12} {:>12} {:>8} {:>8}",
                "ranks",
                "MB",
                "ms",
                "algbw GB/s",
                "busbw GB/s",
                "TCP1 GB/s",
                "TCPxW GB/s",
                "bus/TCP1",
                "bus/TCPxW"
            );
            for r in rows {
                if let Some(e) = r.error {
                    println!("{:>5} {:>8} failed: {e}", r.world_size, r.bytes >> 20);
                    continue;
                }
                println!(
                    "{:>5} {:>8} {:>10.2} {:>12.3} {:>12.3} {:>12.3} {:>12.3} {:>7.0}% {:>8.0}%",
                    r.world_size,
                    r.bytes >> 20,
                    r.seconds * 1e3,
                    r.algbw / 1e9,
                    r.busbw / 1e9,
                    r.tcp_bound / 1e9,
                    r.tcp_concurrent / 1e9,
                    100.0 * r.busbw / r.tcp_bound,
                    100.0 * r.busbw / r.tcp_concurrent
                );
            }
        }
        Cmd::Tokens {
            model,
            input,
            out,
            layer,
            raw,
        } => {
            let n = scfm_worker::infer::dump::run_tokens(
                &model,
                &input,
                matrix_source(layer, raw),
                &out,
                &rt,
            )?;
            eprintln!("wrote the tokens of {n} cells to {}", out.display());
        }
        Cmd::Reference { out } => scfm_worker::reference::export(&out)?,
        Cmd::Versions { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// `bench-allreduce` with TLS: for every world size and buffer size, the plain and the TLS
/// ring's time and bus bandwidth per round, then their medians and ratio.
fn bench_tls_cost(
    world: &[usize],
    mb: &[usize],
    rounds: usize,
    tls: &scfm_worker::collective::RingTls,
) -> Result<()> {
    let rounds = rounds.max(1);
    println!(
        "{:>5} {:>6} {:>6} {:>10} {:>10} {:>12} {:>12} {:>8}",
        "ranks", "MB", "round", "plain ms", "TLS ms", "plain GB/s", "TLS GB/s", "TLS/plain"
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for &w in world {
        for &m in mb {
            let bytes = m << 20;
            let iterations = ((512usize << 20) / bytes.max(1)).clamp(3, 50);
            let r = scfm_worker::collective::bench_tls_cost(w, bytes, iterations, rounds, tls)
                .map_err(anyhow::Error::msg)?;
            let busbw = |s: f64| bytes as f64 / s * 2.0 * (w as f64 - 1.0) / w as f64 / 1e9;
            let row = |round: &str, p: f64, t: f64| {
                println!(
                    "{w:>5} {m:>6} {round:>6} {:>10.2} {:>10.2} {:>12.3} {:>12.3} {:>9.2}",
                    p * 1e3,
                    t * 1e3,
                    busbw(p),
                    busbw(t),
                    t / p
                )
            };
            for (i, x) in r.iter().enumerate() {
                row(&(i + 1).to_string(), x.plain, x.tls);
            }
            let p = median(r.iter().map(|x| x.plain).collect());
            let t = median(r.iter().map(|x| x.tls).collect());
            row("median", p, t);
        }
    }
    Ok(())
}

/// The Python of a side-by-side benchmark: `--python`, else `$SCFM_PYTHON`, else the
/// repository's `.venv/bin/python`.
fn bench_python(python: Option<PathBuf>, repo: &std::path::Path) -> PathBuf {
    python
        .or_else(|| std::env::var_os("SCFM_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| repo.join(".venv/bin/python"))
}

/// Writes a benchmark's results as pretty JSON when `out` is given.
fn write_json(out: Option<&std::path::Path>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(out) = out {
        std::fs::write(out, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
