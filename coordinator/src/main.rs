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

mod prepare_cmd;

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
    /// Run the coordinator of a job; workers join with `scfm-worker join`.
    Launch {
        /// Job manifest (YAML).
        manifest: PathBuf,
        /// Discard the checkpoints at checkpoint.url and start over (default: resume).
        #[arg(long)]
        fresh: bool,
    },
    /// Run a whole job on this machine: the coordinator and N worker processes.
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
    /// Check a manifest and print it resolved.
    Validate {
        /// Job manifest (YAML).
        manifest: PathBuf,
    },
    /// List the model presets with their exact parameter counts.
    Presets {
        /// Gene vocabulary size to count the gene embedding for.
        #[arg(long, default_value_t = 20_000)]
        genes: usize,
    },
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
    if fin.preempted {
        eprintln!(
            "job {} preempted at step {}: checkpoint saved in {}; run the same manifest again to resume",
            m.run_id, fin.step, m.checkpoint.url
        );
    } else {
        eprintln!(
            "job {} finished at step {}; checkpoints and metrics.jsonl in {}",
            m.run_id, fin.step, m.checkpoint.url
        );
    }
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
        Cmd::Train { args } => {
            let bin = worker_binary();
            let status = Command::new(&bin)
                .arg("train")
                .args(&args)
                .status()
                .with_context(|| {
                    format!(
                        "starting {} (build it with `cargo build --release -p scfm-worker`)",
                        bin.display()
                    )
                })?;
            if !status.success() {
                bail!("{} train exited with {status}", bin.display());
            }
        }
        Cmd::Launch { manifest, fresh } => {
            let m = Manifest::load(&manifest)
                .with_context(|| format!("loading {}", manifest.display()))?;
            let fin = runtime()?.block_on(async {
                let c = Coordinator::start_with(&m, &StartOptions { fresh }).await?;
                scfm_coordinator::preempt_on_signals(c.shared.clone());
                println!("coordinator listening on {}", c.addr);
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
        Cmd::Validate { manifest } => {
            let m = Manifest::load(&manifest)
                .with_context(|| format!("loading {}", manifest.display()))?;
            print!("{}", m.to_yaml());
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
    }
    Ok(())
}
