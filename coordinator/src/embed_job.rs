//! `scfm local embed.yaml --workers N` for an embed job (a manifest with `embed:`): N
//! `scfm-worker embed-shards … --rank i --world N` processes, their output streamed with a
//! prefix. Nothing is restarted: a rerun of the same manifest redoes only the parts that are
//! missing or fail verification. SIGTERM/SIGINT (and `embed.timeout_s`) are forwarded as
//! SIGTERM, so each worker stops after its current part; a worker still running
//! `cluster.preempt_grace_s` later is killed. At the end `index.json` must list every
//! shard of the dataset.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use scfm_common::data::prepared::PreparedDataset;
use scfm_common::manifest::EmbedManifest;
use scfm_common::storage::Store;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// `--device` of the workers.
fn device_arg(d: scfm_common::config::Device) -> &'static str {
    match d {
        scfm_common::config::Device::Auto => "auto",
        scfm_common::config::Device::Cpu => "cpu",
        scfm_common::config::Device::Cuda => "cuda",
    }
}

fn spawn(bin: &Path, m: &EmbedManifest, i: usize, world: usize) -> Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.args(["embed-shards", m.model(), m.dataset(), "--out", m.out()])
        .args(["--rank", &i.to_string(), "--world", &world.to_string()])
        .args(["--batch-size", &m.embed.batch_size.to_string()])
        .args([
            "--key",
            &m.embed.key,
            "--device",
            device_arg(m.cluster.device),
        ]);
    if let Some(t) = m.embed.threads {
        cmd.args(["--threads", &t.to_string()]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    scfm_coordinator::local::prefix_output(&mut child, i);
    Ok(child)
}

/// Sends SIGTERM to process `pid` (the `kill` utility: this crate does not link libc).
fn sigterm(pid: u32) {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    if !sent.is_ok_and(|s| s.success()) {
        tracing::warn!(pid, "could not send SIGTERM");
    }
}

/// Why the workers were asked to stop.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Signal,
    Timeout,
}

/// Runs the embed job with `workers` local processes of `worker_bin`.
pub async fn run(m: &EmbedManifest, workers: usize, worker_bin: &Path) -> Result<()> {
    let ds = PreparedDataset::open(m.dataset())
        .await
        .with_context(|| format!("opening the prepared dataset {}", m.dataset()))?;
    let n_shards = ds.manifest.shards.len();
    scfm_coordinator::say!(
        "embed job {}: {} cells in {n_shards} shards of {} with {} -> {}; starting {workers} workers",
        m.run_id,
        ds.manifest.n_cells,
        ds.store.url(),
        m.model(),
        m.out()
    );
    if workers > n_shards {
        tracing::warn!(
            workers,
            shards = n_shards,
            "more workers than shards: some have nothing to do"
        );
    }
    let (kill_tx, kill_rx) = tokio::sync::watch::channel(false);
    let mut set = tokio::task::JoinSet::new();
    let mut pids = Vec::new();
    for i in 0..workers {
        let mut child = spawn(worker_bin, m, i, workers)?;
        pids.push(child.id());
        let mut kill = kill_rx.clone();
        set.spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill.changed() => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            (i, status)
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let deadline = m
        .embed
        .timeout_s
        .map(|s| Instant::now() + Duration::from_secs(s));
    let far = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
    let grace = Duration::from_secs(m.cluster.preempt_grace_s);
    let (mut stop, mut kill_at) = (None, far);
    let mut exits: Vec<Option<std::process::ExitStatus>> = vec![None; workers];
    while !set.is_empty() {
        let mut request = None;
        tokio::select! {
            Some(r) = set.join_next() => {
                let (i, status) = r.context("worker watcher")?;
                let status = status.with_context(|| format!("waiting for worker {i}"))?;
                exits[i] = Some(status);
            }
            _ = term.recv(), if stop.is_none() => request = Some(Stop::Signal),
            _ = int.recv(), if stop.is_none() => request = Some(Stop::Signal),
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if stop.is_none() && deadline.is_some() => {
                request = Some(Stop::Timeout);
            }
            _ = tokio::time::sleep_until(kill_at), if stop.is_some() => {
                tracing::warn!(grace_s = grace.as_secs(), "workers still running after the grace period: killing them");
                let _ = kill_tx.send(true);
                kill_at = far;
            }
        }
        if let Some(why) = request {
            let what = match why {
                Stop::Signal => "stop requested".to_string(),
                Stop::Timeout => format!(
                    "embed.timeout_s ({} s) passed",
                    m.embed.timeout_s.unwrap_or(0)
                ),
            };
            scfm_coordinator::say!(
                "embed job {}: {what}; asking the workers to stop after their current part",
                m.run_id
            );
            for (pid, exit) in pids.iter().zip(&exits) {
                if let (Some(p), None) = (pid, exit) {
                    sigterm(*p);
                }
            }
            stop = Some(why);
            kill_at = Instant::now() + grace;
        }
    }
    let failed: Vec<String> = exits
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Some(s) if s.success() => None,
            Some(s) => Some(format!("worker {i} exited with {s}")),
            None => Some(format!("worker {i} did not report")),
        })
        .collect();
    let again = "verified parts are kept: run the same manifest again to do the rest";
    match stop {
        Some(Stop::Signal) if failed.is_empty() => {
            scfm_coordinator::say!("embed job {} stopped; {again}", m.run_id);
            return Ok(());
        }
        Some(Stop::Timeout) => bail!(
            "embed job {} stopped after embed.timeout_s; {again}",
            m.run_id
        ),
        _ if !failed.is_empty() => bail!("embed job {}: {}; {again}", m.run_id, failed.join("; ")),
        _ => {}
    }
    check_index(m, &ds).await
}

/// Checks that `index.json` lists every shard of `ds` once, with its cells.
async fn check_index(m: &EmbedManifest, ds: &PreparedDataset) -> Result<()> {
    let out = Store::open(m.out())?;
    let url = out.url_of("index.json");
    let Some(bytes) = out.get_opt("index.json").await? else {
        bail!("every worker finished but {url} was not written");
    };
    let index: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {url}"))?;
    let parts = index["parts"].as_array().cloned().unwrap_or_default();
    let listed: Vec<(u64, u64)> = parts
        .iter()
        .map(|p| {
            (
                p["shard"].as_u64().unwrap_or(u64::MAX),
                p["n_cells"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let expect: Vec<(u64, u64)> = ds
        .manifest
        .shards
        .iter()
        .enumerate()
        .map(|(s, i)| (s as u64, i.n_cells as u64))
        .collect();
    if listed != expect || index["dataset_identity"] != ds.manifest.identity().as_str() {
        bail!(
            "{url} does not list the {} shards of {} ({} listed): run the same manifest again",
            expect.len(),
            ds.store.url(),
            listed.len()
        );
    }
    scfm_coordinator::say!(
        "embed job {}: {} cells in {} parts; index {url}",
        m.run_id,
        ds.manifest.n_cells,
        parts.len()
    );
    Ok(())
}
