//! `scfm local`: a whole cluster on this machine — the coordinator in this process and
//! N `scfm-worker join` processes on 127.0.0.1, their output streamed with a prefix.

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
    Ok(child)
}

/// Runs the job with `workers` local worker processes; returns the last step.
pub async fn run_local(
    mut manifest: Manifest,
    workers: usize,
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
    let mut children = Vec::with_capacity(workers);
    for i in 0..workers {
        children.push(spawn_worker(&worker_bin, i, &url, &token, &manifest)?);
    }
    // A worker process that dies is lost at once (no need to wait for its heartbeats to
    // stop): the others go on in a new generation while at least min_workers remain.
    let shared = coord.shared.clone();
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(usize, Option<u32>, std::process::ExitStatus)>(workers);
    for (i, mut c) in children.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            let pid = c.id();
            let status = c.wait().await;
            if let Ok(s) = status {
                let _ = tx.send((i, pid, s)).await;
            }
        });
    }
    drop(tx);
    let watcher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some((i, pid, status)) = rx.recv().await {
                let mut s = shared.lock();
                if status.success() || s.is_over() {
                    continue;
                }
                let why = format!("worker process {i} exited with {status}");
                match pid.and_then(|p| s.worker_with_pid(p)) {
                    Some(id) => s.lose(&id, &why),
                    // It never registered: nothing to re-form, but it will not come.
                    None => tracing::warn!("{why}"),
                }
                drop(s);
                shared.changed.send_modify(|v| *v += 1);
            }
        })
    };
    let result = coord.wait().await;
    // Workers exit on their own once the job is over; give them a moment, then stop them.
    let _ = tokio::time::timeout(Duration::from_secs(30), watcher).await;
    result
}
