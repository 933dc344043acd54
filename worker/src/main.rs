//! `scfm-worker`: trains the model in this process (`train`), exports reference tensors
//! for the PyTorch cross-check (`reference`), and benchmarks training steps (`bench`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use scfm_common::config::TrainSpec;
use scfm_worker::trainer::{RunOptions, Trainer};

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
        /// Timed steps per round.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Warm-up steps per round.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Python with torch (default: $SCFM_PYTHON or .venv/bin/python).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Ring all-reduce bus bandwidth over loopback next to the loopback TCP bound.
    BenchAllreduce {
        /// World sizes (one thread per rank in this process).
        #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
        world: Vec<usize>,
        /// Buffer sizes in MB.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        mb: Vec<usize>,
    },
    /// Write a fixed small model, inputs and outputs as safetensors for the PyTorch cross-check.
    Reference {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    scfm_common::alloc::tune();
    let cli = Cli::parse();
    scfm_common::telemetry::init_logging(&cli.log_format);
    scfm_common::install_crypto_provider();
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
            scfm_worker::preempt::install_signal_handlers()?;
            let opts = RunOptions {
                resume,
                fresh,
                stop_after,
                json,
                ..RunOptions::default()
            };
            let mut trainer = Trainer::new(spec, &opts)?;
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
        Cmd::Join {
            coordinator,
            token,
            bind,
            tls_ca,
            tls_domain,
        } => {
            scfm_worker::preempt::install_signal_handlers()?;
            let args = scfm_worker::dist::JoinArgs {
                coordinator,
                token,
                bind,
                tls_ca,
                tls_domain,
            };
            match scfm_worker::dist::join(&args)? {
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
            steps,
            warmup,
            rounds,
            python,
            out,
        } => {
            let repo = std::env::current_dir()?;
            let python = python
                .or_else(|| std::env::var_os("SCFM_PYTHON").map(PathBuf::from))
                .unwrap_or_else(|| repo.join(".venv/bin/python"));
            let args = scfm_worker::bench::BenchArgs {
                presets,
                cells,
                seq_len,
                genes,
                threads,
                steps,
                warmup,
                rounds,
                python,
                repo,
            };
            let results = scfm_worker::bench::run(&args)?;
            if let Some(out) = out {
                std::fs::write(&out, serde_json::to_vec_pretty(&results)?)
                    .with_context(|| format!("writing {}", out.display()))?;
            }
        }
        Cmd::BenchAllreduce { world, mb } => {
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
        Cmd::Reference { out } => scfm_worker::reference::export(&out)?,
    }
    Ok(())
}
