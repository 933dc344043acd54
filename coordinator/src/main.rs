//! `scfm`: the user-facing command. This crate does not link libtorch; commands that
//! need the model run the `scfm-worker` binary installed beside this one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use scfm_common::config::ModelConfig;
use scfm_common::config::model::PRESETS;
use scfm_common::manifest::Manifest;
use scfm_coordinator::{Coordinator, StartOptions};

mod embed_job;
mod glibc_compat;
mod metrics_cmd;
mod prepare_cmd;
mod status_cmd;

#[derive(Parser)]
#[command(
    name = "scfm",
    version,
    about = "scfm: train single-cell RNA-seq foundation models"
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
    /// Train in one process from a training file (runs `scfm-worker train`).
    Train {
        /// Arguments for `scfm-worker train` (e.g. --config FILE --resume).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Cell embeddings of a trained model, written into a new .h5ad with the input's obs
    /// and var (runs `scfm-worker embed`; see `scfm embed --help`).
    #[command(disable_help_flag = true)]
    Embed {
        /// Arguments for `scfm-worker embed` (MODEL INPUT --out OUT.h5ad ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Score a model's embedding beside the PCA baseline and the random-init model (runs
    /// `scfm-worker evaluate`).
    #[command(disable_help_flag = true)]
    Evaluate {
        /// Arguments for `scfm-worker evaluate` (MODEL DATA --label-key KEY ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write a model folder PyTorch loads (runs `scfm-worker export`).
    #[command(disable_help_flag = true)]
    Export {
        /// Arguments for `scfm-worker export` (CHECKPOINT --out DIR ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the coordinator of a job; workers join with `scfm-worker join`.
    Launch {
        /// Job manifest (YAML).
        manifest: PathBuf,
        /// Discard the checkpoints at checkpoint.url and start over (default: resume).
        #[arg(long)]
        fresh: bool,
    },
    /// Run a whole job on this machine: the coordinator and N worker processes (for an
    /// embed job, a manifest with `embed:`, N `scfm-worker embed-shards` processes).
    Local {
        /// Job manifest (YAML).
        manifest: PathBuf,
        /// Number of worker processes.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Start a new worker process in place of one that dies, this many times in all
        /// (it joins the next generation with a peer's state).
        #[arg(long, default_value_t = 0)]
        max_restarts: usize,
        /// Discard the checkpoints at checkpoint.url and start over (default: resume).
        #[arg(long)]
        fresh: bool,
    },
    /// Turn input files into a prepared (sharded) dataset for training.
    Prepare(Box<prepare_cmd::PrepareArgs>),
    /// Print the state of a job: from its coordinator (host:port) or its run's files.
    Status(status_cmd::StatusArgs),
    /// Check a YAML file of any kind (job manifest, embed job, training file, prepare
    /// settings), say which kind it is, and print it resolved.
    Validate {
        /// The file (YAML).
        manifest: PathBuf,
    },
    /// List the model presets with their exact parameter counts.
    Presets {
        /// Gene vocabulary size to count the gene embedding for.
        #[arg(long, default_value_t = 20_000)]
        genes: usize,
    },
    /// Plot a run (loss, learning rate, throughput, workers, ...) into DIR/index.html.
    Report(scfm_coordinator::report::ReportArgs),
    /// Print the lines of a run's metrics log that count (its parts concatenated, rolled
    /// back steps left out), one JSON object per line.
    Metrics(metrics_cmd::MetricsArgs),
}

/// `scfm-worker` next to this executable, or on PATH.
fn worker_binary() -> PathBuf {
    let name = "scfm-worker";
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
    {
        let p = dir.join(name);
        if p.exists() {
            return p;
        }
    }
    Path::new(name).to_path_buf()
}

fn report(m: &Manifest, fin: scfm_coordinator::Finished) {
    if fin.preempted && !fin.started {
        scfm_coordinator::say!(
            "job {} preempted before training started: nothing new to checkpoint; run the same manifest again to start",
            m.run_id
        );
    } else if fin.preempted {
        scfm_coordinator::say!(
            "job {} preempted at step {}: checkpoint saved in {}; run the same manifest again to resume",
            m.run_id,
            fin.step,
            m.checkpoint.url
        );
    } else {
        scfm_coordinator::say!(
            "job {} finished at step {}; checkpoints and metrics (scfm metrics) in {}",
            m.run_id,
            fin.step,
            m.checkpoint.url
        );
    }
}

/// Runs `scfm-worker SUB ARGS...` (the commands that need libtorch), with its exit status.
fn forward(sub: &str, args: &[String]) -> Result<()> {
    let bin = worker_binary();
    let status = Command::new(&bin)
        .arg(sub)
        .args(args)
        .status()
        .with_context(|| {
            format!(
                "starting {} (build it with `cargo build --release -p scfm-worker`)",
                bin.display()
            )
        })?;
    if !status.success() {
        bail!("{} {sub} exited with {status}", bin.display());
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn main() -> Result<()> {
    scfm_common::alloc::tune();
    let cli = Cli::parse();
    scfm_common::telemetry::init_logging(&cli.log_format);
    scfm_common::install_crypto_provider();
    match cli.cmd {
        Cmd::Train { args } => forward("train", &args)?,
        Cmd::Embed { args } => forward("embed", &args)?,
        Cmd::Evaluate { args } => forward("evaluate", &args)?,
        Cmd::Export { args } => forward("export", &args)?,
        Cmd::Launch { manifest, fresh } => {
            let m = Manifest::load(&manifest)
                .with_context(|| format!("loading {}", manifest.display()))?;
            let fin = runtime()?.block_on(async {
                let c = Coordinator::start_with(&m, &StartOptions { fresh }).await?;
                scfm_coordinator::preempt_on_signals(c.shared.clone());
                {
                    use std::io::Write;
                    // Never a panic on a closed stdout (the reader may be gone).
                    let mut out = std::io::stdout();
                    let _ = writeln!(out, "coordinator listening on {}", c.addr);
                    let _ = out.flush();
                }
                c.wait().await
            })?;
            report(&m, fin);
        }
        Cmd::Local {
            manifest,
            workers,
            max_restarts,
            fresh,
        } => {
            if workers == 0 {
                bail!("--workers must be at least 1");
            }
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            if scfm_common::manifest::is_embed_yaml(&text) {
                if fresh || max_restarts > 0 {
                    bail!(
                        "--fresh and --max-restarts are for training jobs (an embed job keeps verified parts and redoes the rest; delete embed.out to start over)"
                    );
                }
                let m = scfm_common::manifest::EmbedManifest::load(&manifest)
                    .with_context(|| format!("loading {}", manifest.display()))?;
                return runtime()?.block_on(embed_job::run(&m, workers, &worker_binary()));
            }
            let m = Manifest::load(&manifest)
                .with_context(|| format!("loading {}", manifest.display()))?;
            let fin = runtime()?.block_on(scfm_coordinator::local::run_local(
                m.clone(),
                workers,
                max_restarts,
                worker_binary(),
                &StartOptions { fresh },
            ))?;
            report(&m, fin);
        }
        Cmd::Prepare(args) => args.run()?,
        Cmd::Status(args) => args.run()?,
        Cmd::Validate { manifest } => {
            let file = scfm_common::manifest::ConfigFile::load(&manifest)
                .with_context(|| format!("loading {}", manifest.display()))?;
            print!(
                "# {} is valid: {}\n{}",
                manifest.display(),
                file.kind(),
                file.to_yaml()
            );
        }
        Cmd::Presets { genes } => {
            println!(
                "{:<8} {:>6} {:>6} {:>6} {:>14}",
                "preset", "hidden", "layers", "heads", "parameters"
            );
            for p in PRESETS {
                let c = ModelConfig::preset(p)?;
                println!(
                    "{:<8} {:>6} {:>6} {:>6} {:>14}",
                    p,
                    c.hidden,
                    c.n_layers,
                    c.n_heads,
                    c.param_count(genes)
                );
            }
        }
        Cmd::Report(args) => {
            let index = runtime()?.block_on(args.run())?;
            println!("report written to {}", index.display());
        }
        Cmd::Metrics(args) => args.run()?,
    }
    Ok(())
}
