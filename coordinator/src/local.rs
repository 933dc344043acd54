//! `scfm local`: a whole cluster on this machine — the coordinator in this process and
//! N `scfm-worker join` processes on 127.0.0.1, their output streamed with a prefix. A
//! worker process that dies is lost at once (its peers go on as a new generation) and,
//! up to `max_restarts` times, replaced by a new process that joins the next generation
//! with a peer's state (like `torchrun --max-restarts`, but without restarting the others).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use scfm_common::manifest::Manifest;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::server::Shared;
use crate::{Coordinator, CoordinatorError};

/// The label of a worker process's output lines: its worker id (`w0000`, as the
/// coordinator, `scfm status` and the metrics log name it) once it registered, before that
/// its process id (`pid 4242`).
fn worker_label(shared: Arc<Shared>, pid: Option<u32>) -> Arc<dyn Fn() -> String + Send + Sync> {
    let id = OnceLock::new();
    Arc::new(move || {
        if let Some(id) = id.get() {
            return String::clone(id);
        }
        let Some(pid) = pid else {
            return "worker".into();
        };
        match shared.lock().worker_with_pid(pid) {
            Some(w) => String::clone(id.get_or_init(|| w)),
            None => format!("pid {pid}"),
        }
    })
}

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
    let label = format!("w{i}");
    prefix_output_with(child, Arc::new(move || label.clone()));
}

/// Copies the child's stdout and stderr lines to this process's stderr, each prefixed
/// with `[LABEL]` (`label` is asked for every line), on background tasks. A write that
/// fails (the process reading this one's stderr is gone: EPIPE) is dropped, and the
/// child's output is still read to its end, so that the child never blocks on a full
/// pipe (it would then not stop when asked to).
pub fn prefix_output_with(child: &mut Child, label: Arc<dyn Fn() -> String + Send + Sync>) {
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
        let label = label.clone();
        tokio::spawn(async move {
            use std::io::Write;
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // The label first: it may lock the job state, which must never be waited
                // for while holding stderr (a thread holding the state may be logging).
                let label = label();
                let _ = writeln!(std::io::stderr(), "[{label}] {line}");
            }
        });
    }
}

fn spawn_worker(
    bin: &PathBuf,
    shared: &Arc<Shared>,
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
        if tls.ring {
            // The ring's TLS presents the same certificate and key as gRPC.
            cmd.arg("--ring-tls-cert")
                .arg(&tls.cert)
                .arg("--ring-tls-key")
                .arg(&tls.key);
        }
    }
    let mut child = cmd
        .env("SCFM_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CoordinatorError::Process(format!("cannot start {}: {e}", bin.display())))?;
    let label = worker_label(shared.clone(), child.id());
    prefix_output_with(&mut child, label);
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
    crate::say!(
        "coordinator on {url}; starting {workers} workers (their output is prefixed with their worker id once registered, [pid N] before)"
    );
    // A worker process that dies is lost at once (no need to wait for its heartbeats to
    // stop): the others go on in a new generation while at least min_workers remain.
    let shared = coord.shared.clone();
    type Exit = (Option<u32>, std::process::ExitStatus);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Exit>(workers + max_restarts);
    let watch = |mut c: Child, tx: tokio::sync::mpsc::Sender<Exit>| {
        tokio::spawn(async move {
            let pid = c.id();
            if let Ok(s) = c.wait().await {
                let _ = tx.send((pid, s)).await;
            }
        });
    };
    for _ in 0..workers {
        watch(
            spawn_worker(&worker_bin, &shared, &url, &token, &manifest)?,
            tx.clone(),
        );
    }
    let watcher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let (mut restarts, mut alive) = (0, workers);
            while let Some((pid, status)) = rx.recv().await {
                alive -= 1;
                let what = {
                    let mut s = shared.lock();
                    if s.is_over() && alive == 0 {
                        break;
                    }
                    if status.success() || s.is_over() {
                        continue;
                    }
                    let pid = pid.map_or("?".into(), |p| p.to_string());
                    match pid.parse().ok().and_then(|p| s.worker_with_pid(p)) {
                        Some(id) => {
                            let what = format!("worker {id} (pid {pid})");
                            s.lose(&id, &format!("{what} exited with {status}"));
                            what
                        }
                        // It never registered: nothing to re-form, but it will not come.
                        None => {
                            let what = format!("worker process {pid}");
                            tracing::warn!("{what} exited with {status} before it registered");
                            what
                        }
                    }
                };
                shared.changed.send_modify(|v| *v += 1);
                if restarts < max_restarts {
                    restarts += 1;
                    tracing::warn!(
                        restart = restarts,
                        max_restarts,
                        "starting a worker process in place of {what}"
                    );
                    match spawn_worker(&worker_bin, &shared, &url, &token, &manifest) {
                        Ok(c) => {
                            alive += 1;
                            watch(c, tx.clone());
                        }
                        Err(e) => tracing::error!(error = %e, "cannot start a replacement worker"),
                    }
                }
            }
        })
    };
    let result = coord.wait().await;
    // Workers exit on their own once the job is over; give them a moment, then stop them.
    let _ = tokio::time::timeout(Duration::from_secs(30), watcher).await;
    result
}
