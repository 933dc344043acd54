//! `scfm metrics RUN`: the lines of a run's metrics log that count, as JSON lines on
//! stdout — its numbered parts (`metrics/part-*.jsonl`) concatenated, with the lines that
//! a `rollback` discounted left out.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use scfm_common::metrics_log;
use scfm_common::storage::Store;

/// How long reading the log may take in all.
const DEADLINE: Duration = Duration::from_secs(600);

/// Arguments of `scfm metrics`.
#[derive(clap::Args)]
pub struct MetricsArgs {
    /// The run: its checkpoint.url (local directory, file://, s3://, gs://, az://).
    run: String,
}

impl MetricsArgs {
    /// Reads the log and prints it.
    pub fn run(self) -> Result<()> {
        let local = self
            .run
            .strip_prefix("file://")
            .or((!self.run.contains("://")).then_some(self.run.as_str()));
        if let Some(p) = local
            && !std::path::Path::new(p).is_dir()
        {
            bail!("no run at {p}: no such directory");
        }
        let store = Store::open(&self.run)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let lines = rt
            .block_on(async {
                tokio::time::timeout(DEADLINE, metrics_log::read_effective(&store)).await
            })
            .with_context(|| format!("reading the metrics log of {} timed out", self.run))??;
        let Some(lines) = lines else {
            bail!(
                "{} has no metrics log (metrics/part-*.jsonl): RUN must be a run's checkpoint.url",
                store.url()
            );
        };
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let written = lines
            .iter()
            .try_for_each(|v| writeln!(out, "{v}"))
            .and_then(|()| out.flush());
        match written {
            // The reader went away (`| head`): not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => Ok(r?),
        }
    }
}
