//! `scfm`: the user-facing command. This crate does not link libtorch; commands that
//! need the model run the `scfm-worker` binary installed beside this one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use scfm_common::config::ModelConfig;
use scfm_common::config::model::PRESETS;

#[derive(Parser)]
#[command(
    name = "scfm",
    version,
    about = "scfm: train single-cell RNA-seq foundation models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train in this machine's process from a training file (runs `scfm-worker train`).
    Train {
        /// Arguments for `scfm-worker train` (e.g. --config FILE --resume).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
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

fn main() -> Result<()> {
    let cli = Cli::parse();
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
