//! `scfm status RUN_URL_OR_COORDINATOR`: the state of a job, from its running
//! coordinator or from the files of its run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use scfm_coordinator::status::live::{ClientOptions, query};
use scfm_coordinator::status::{Target, files};

/// How long reading a run's files may take in all (each store request has its own
/// deadline and retries below this).
const FILES_DEADLINE: Duration = Duration::from_secs(60);

/// Arguments of `scfm status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// A running coordinator (`http://host:port`, `https://host:port`, `host:port`) or a
    /// run's checkpoint URL or directory (path, file://, s3://, gs://, az://).
    target: String,
    /// Shared token of the job (default: $SCFM_TOKEN).
    #[arg(long, env = "SCFM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify an https:// coordinator with.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Server name in the coordinator's certificate.
    #[arg(long)]
    tls_domain: Option<String>,
    /// Deadline, in seconds, of connecting to the coordinator and of its answer.
    #[arg(long, default_value_t = 5.0)]
    timeout_s: f64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

impl StatusArgs {
    /// Reads the status and prints it.
    pub fn run(self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let status = match Target::parse(&self.target) {
            Target::Coordinator(url) => {
                let url = match (&self.tls_ca, url.strip_prefix("http://")) {
                    (Some(_), Some(rest)) if !self.target.starts_with("http://") => {
                        format!("https://{rest}")
                    }
                    _ => url,
                };
                let opts = ClientOptions {
                    token: self.token.clone(),
                    tls_ca: self.tls_ca.clone(),
                    tls_domain: self.tls_domain.clone(),
                    timeout: Duration::try_from_secs_f64(self.timeout_s)
                        .context("--timeout-s must be a positive number of seconds")?,
                };
                rt.block_on(query(&url, &opts))?
            }
            Target::Run(url) => rt
                .block_on(async { tokio::time::timeout(FILES_DEADLINE, files::read(&url)).await })
                .with_context(|| {
                    format!("reading the run at {url} took longer than {FILES_DEADLINE:?}")
                })??,
        };
        if self.json {
            println!("{}", serde_json::to_string(&status)?);
        } else {
            print!("{status}");
        }
        Ok(())
    }
}
