//! `scfm local`: a whole cluster on this machine — the coordinator in this process and
//! N `scfm-worker join` processes on 127.0.0.1, their output streamed with a prefix. A
//! worker process that dies is lost at once (its peers go on as a new generation) and,
//! up to `max_restarts` times, replaced by a new process that joins the next generation
//! with a peer's state (like `torchrun --max-restarts`, but without restarting the others).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use scfm_common::manifest::Manifest;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{Coordinator, CoordinatorError};

/// A token for a local run when the manifest has none (workers are our own children).
fn local_token() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:016x}",
        scfm_common::rng::derive_seed(t as u64, &[std::process::id() as u64])
    )
}

/// Copies the child's stdout and stderr lines to this process's stderr, each prefixed
/// with `[wI]`, on background tasks.
pub fn prefix_output(child: &mut Child, i: usize) {
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child.stderr.take().map(|s| Box::new(s) as _),
    ]
    .into_iter()
    .flatten()
    {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[w{i}] {line}");
            }
        });
    }
}

fn spawn_worker(
    bin: &PathBuf,
    i: usize,
    url: &str,
    token: &str,
    m: &Manifest,
) -> Result<Child, CoordinatorError> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "join",
        "--coordinator",
        url,
        "--bind",
        &m.cluster.worker_host,
    ]);
    if let Some(tls) = &m.auth.tls {
        cmd.arg("--tls-ca")
            .arg(&tls.ca)
            .args(["--tls-domain", tls.domain.as_deref().unwrap_or("localhost")]);
    }
    let mut child = cmd
        .env("SCFM_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CoordinatorError::Process(format!("cannot start {}: {e}", bin.display())))?;
    prefix_output(&mut child, i);
    Ok(child)
}

/// Runs the job with `workers` local worker processes, replacing up to `max_restarts`
/// that die; returns how it finished.
pub async fn run_local(
    mut manifest: Manifest,
    workers: usize,
    max_restarts: usize,
    worker_bin: PathBuf,
    opts: &crate::StartOptions,
) -> Result<crate::Finished, CoordinatorError> {
    manifest.cluster.max_workers = workers;
    manifest.cluster.min_workers = manifest.cluster.min_workers.min(workers);
    manifest.cluster.coordinator = "127.0.0.1:0".into();
    let token = match manifest.token() {
        Some(t) => t,
        None => {
            let t = local_token();
            manifest.auth.token = Some(t.clone());
            t
        }
    };
    manifest.validate()?;
    let coord = Coordinator::start_with(&manifest, opts).await?;
    crate::preempt_on_signals(coord.shared.clone());
    let scheme = if manifest.auth.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}", coord.addr);
    eprintln!("coordinator on {url}; starting {workers} workers");
    // A worker process that dies is lost at once (no need to wait for its heartbeats to
    // stop): the others go on in a new generation while at least min_workers remain.
    let shared = coord.shared.clone();
    type Exit = (usize, Option<u32>, std::process::ExitStatus);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Exit>(workers + max_restarts);
    let watch = |i: usize, mut c: Child, tx: tokio::sync::mpsc::Sender<Exit>| {
        tokio::spawn(async move {
            let pid = c.id();
            if let Ok(s) = c.wait().await {
                let _ = tx.send((i, pid, s)).await;
            }
        });
    };
    for i in 0..workers {
        watch(
            i,
            spawn_worker(&worker_bin, i, &url, &token, &manifest)?,
            tx.clone(),
        );
    }
    let watcher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let (mut restarts, mut next, mut alive) = (0, workers, workers);
            while let Some((i, pid, status)) = rx.recv().await {
                alive -= 1;
                {
                    let mut s = shared.lock();
                    if s.is_over() && alive == 0 {
                        break;
                    }
                    if status.success() || s.is_over() {
                        continue;
                    }
                    let why = format!("worker process {i} exited with {status}");
                    match pid.and_then(|p| s.worker_with_pid(p)) {
                        Some(id) => s.lose(&id, &why),
                        // It never registered: nothing to re-form, but it will not come.
                        None => tracing::warn!("{why}"),
                    }
                }
                shared.changed.send_modify(|v| *v += 1);
                if restarts < max_restarts {
                    restarts += 1;
                    tracing::warn!(
                        worker = next,
                        restart = restarts,
                        max_restarts,
                        "starting a worker process in place of worker process {i}"
                    );
                    match spawn_worker(&worker_bin, next, &url, &token, &manifest) {
                        Ok(c) => {
                            alive += 1;
                            watch(next, c, tx.clone());
                        }
                        Err(e) => tracing::error!(error = %e, "cannot start a replacement worker"),
                    }
                    next += 1;
                }
            }
        })
    };
    let result = coord.wait().await;
    // Workers exit on their own once the job is over; give them a moment, then stop them.
    let _ = tokio::time::timeout(Duration::from_secs(30), watcher).await;
    result
}
