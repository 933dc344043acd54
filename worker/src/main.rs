//! `scfm-worker`: trains the model in this process (`train`) or as a cluster job's worker
//! (`join`); embeds, evaluates and exports trained models (`embed`, `embed-shards`,
//! `evaluate`, `export`; `model_cmd`); benchmarks training steps (`bench`, `bench-step`),
//! embedding throughput (`bench-embed`) and the ring all-reduce (`bench-allreduce`), and
//! checks NCCL (`nccl-check`; `bench_cmd`); exports reference tensors for the PyTorch
//! cross-check (`reference`) and reports its libraries (`versions`).

mod bench_cmd;
mod model_cmd;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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
    Train(model_cmd::TrainCli),
    /// Join a cluster job: register with the coordinator and train this worker's share.
    Join(model_cmd::JoinCli),
    /// Training steps/s of scfm vs the same model in PyTorch eager, side by side.
    Bench(bench_cmd::BenchCli),
    /// Embedding cells/s of scfm vs scfm_torch (PyTorch) on the same cells, weights and
    /// threads, side by side; checks that both compute the same embeddings.
    BenchEmbed(bench_cmd::BenchEmbedCli),
    /// Training steps/s, tokens/s and MFU of presets on one device against the matmul peak
    /// measured in the same run, the CPU-vs-device loss agreement on the same weights and
    /// batch, and the host memory high-water mark (the GPU bundle runs it on a GPU).
    BenchStep(bench_cmd::BenchStepCli),
    /// NCCL on CUDA device 0 with a one-rank communicator: loads the library, forms the
    /// communicator, all-reduces a buffer and checks it (needs `--features nccl` and a GPU).
    NcclCheck(bench_cmd::NcclCheckCli),
    /// Ring all-reduce bus bandwidth over loopback next to the loopback TCP bound.
    BenchAllreduce(bench_cmd::BenchAllreduceCli),
    /// Cell embeddings of a trained model, written into a new .h5ad (obsm['X_scfm']).
    Embed(Box<model_cmd::EmbedCli>),
    /// One worker's share of a distributed embedding of a prepared dataset: shard s goes to
    /// rank s % WORLD, one part per shard in OUT/parts/ (verified parts are kept, so a rerun
    /// resumes); the worker that finds every part done writes OUT/index.json. SIGTERM stops
    /// it after the current part (exit 0). `scfm local embed.yaml` runs one per worker.
    EmbedShards(Box<model_cmd::EmbedShardsCli>),
    /// Score a model's cell embedding beside the PCA baseline and the random-init model.
    Evaluate(Box<model_cmd::EvaluateCli>),
    /// Write a model folder PyTorch loads (config.json, model.safetensors, vocab.tsv, README.md).
    Export(model_cmd::ExportCli),
    /// Write the padded inference tokens `embed` feeds the model (genes, bins, values) as
    /// safetensors, for the PyTorch package's equality test.
    #[command(hide = true)]
    Tokens(model_cmd::TokensCli),
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
        Cmd::Train(a) => model_cmd::train(a, &rt, &control),
        Cmd::Join(a) => model_cmd::join(a, &rt, &control),
        Cmd::Embed(e) => model_cmd::embed(*e, &rt),
        Cmd::EmbedShards(e) => model_cmd::embed_shards(*e, &rt, &control),
        Cmd::Evaluate(e) => model_cmd::evaluate(*e, &rt),
        Cmd::Export(a) => model_cmd::export(a, &rt),
        Cmd::Tokens(a) => model_cmd::tokens(a, &rt),
        Cmd::Bench(a) => bench_cmd::bench(a),
        Cmd::BenchEmbed(a) => bench_cmd::bench_embed(a, &rt),
        Cmd::BenchStep(a) => bench_cmd::bench_step(a),
        Cmd::NcclCheck(a) => bench_cmd::nccl_check(a),
        Cmd::BenchAllreduce(a) => bench_cmd::bench_allreduce(a),
        Cmd::Reference { out } => Ok(scfm_worker::reference::export(&out)?),
        Cmd::Versions { .. } => unreachable!("handled above"),
    }
}
