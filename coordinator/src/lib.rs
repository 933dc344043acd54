//! `scfm-coordinator`: the gRPC coordinator of a training job and the local launcher.
//! It does not link libtorch.

pub mod error;
pub mod local;
pub mod metrics;
pub mod nccl_id;
pub mod persist;
pub mod reform;
pub mod report;
pub mod server;
pub mod state;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use scfm_common::checkpoint::{ResumePoint, discard_all, json_diff, select_verified};
use scfm_common::config::{run_settings, without_read_out};
use scfm_common::data::prepared::data_identity;
use scfm_common::manifest::Manifest;
use scfm_common::rpc::pb::coordinator_server::CoordinatorServer;
use scfm_common::storage::Store;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};

pub use error::CoordinatorError;
use server::{Service, Shared};
use state::Phase;

/// Writes a line to stderr like `eprintln!`, but drops it when stderr is gone (a closed
/// pipe: EPIPE) instead of panicking, so that a command whose reader died still stops on
/// SIGTERM and checkpoints.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Last step any worker reported.
    pub step: u64,
    /// Whether it stopped on a preemption (relaunch the same manifest to resume).
    pub preempted: bool,
    /// Whether training started (a first generation formed); a preemption before it
    /// ends the job with nothing new to checkpoint.
    pub started: bool,
}

/// Asks the job to checkpoint and stop when this process gets SIGTERM or SIGINT.
pub fn preempt_on_signals(shared: Arc<Shared>) {
    use tokio::signal::unix::{SignalKind, signal};
    // Both handlers are installed here, before the caller announces its address, so a
    // signal sent as soon as the address is printed cannot kill the process (a handler
    // first installed inside the spawned task could come too late).
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM/SIGINT");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = term.recv() => {}
                Some(()) = int.recv() => {}
                else => return,
            }
            shared.preempt();
        }
    });
}

/// A running coordinator.
pub struct Coordinator {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Shared state (for inspection).
    pub shared: Arc<Shared>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    store: Store,
}

/// How the coordinator starts.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Discard the checkpoints at the manifest's checkpoint URL and start over.
    pub fresh: bool,
}

/// Where the run starts: the newest checkpoint that verifies (older ones when newer ones
/// fail verification), refused when it was trained with other settings than the
/// manifest's (the differences are named); step 0 when there is none.
pub async fn resume_point(store: &Store, m: &Manifest) -> Result<ResumePoint, CoordinatorError> {
    let Some(v) = select_verified(store).await? else {
        return Ok(ResumePoint::default());
    };
    let at = ResumePoint::of(&v, store)?;
    let spec = m.train_spec()?;
    let identity = data_identity(&spec.data.path).await?;
    let want = run_settings(&spec.model, &spec.data, &identity, &spec.training);
    // Read-out settings may differ (checkpoints of older versions still list them).
    let have = without_read_out(&v.state.state["settings"]);
    let diff = json_diff("", &have, &want);
    if !diff.is_empty() {
        return Err(CoordinatorError::Checkpoint(format!(
            "{} was trained with other settings than {} asks for: {}; run with --fresh to start over (discarding those checkpoints) or use another checkpoint.url",
            store.url_of(&v.dir),
            m.run_id,
            diff.join(", "),
        )));
    }
    Ok(at)
}

/// Refuses a job that would listen on an address other machines can reach without a
/// token: anyone who reaches it could register a worker, receive the manifest and push
/// gradients into the run. Loopback addresses (`127.0.0.1`, `::1`) need no token.
pub fn check_listen_auth(m: &Manifest) -> Result<(), CoordinatorError> {
    let addr: SocketAddr = m.cluster.coordinator.parse().map_err(|_| {
        CoordinatorError::Config(format!(
            "cluster.coordinator `{}` is not a host:port socket address",
            m.cluster.coordinator
        ))
    })?;
    if addr.ip().is_loopback() {
        return Ok(());
    }
    let why = match m.token() {
        Some(t) if !t.is_empty() => return Ok(()),
        Some(_) => "its token is empty",
        None => "the manifest has no token",
    };
    Err(CoordinatorError::Config(format!(
        "refusing to listen on {addr} (cluster.coordinator): it is not a loopback address and \
         {why}, so anyone who reaches it could join the job. Set a token: add `auth: \
         {{token_env: SCFM_TOKEN}}` to the manifest and export SCFM_TOKEN with a long random \
         secret for `scfm launch` and every `scfm-worker join` (see docs/operations.md, \
         \"Security\"); or listen on 127.0.0.1"
    )))
}

impl Coordinator {
    /// Binds the manifest's address and starts serving (plus the watchdog and, when
    /// configured, the Prometheus endpoint). A non-loopback address without a token is
    /// refused ([`check_listen_auth`]).
    pub async fn start(manifest: &Manifest) -> Result<Self, CoordinatorError> {
        Self::start_with(manifest, &StartOptions::default()).await
    }

    /// [`Coordinator::start`] with options (`--fresh`).
    pub async fn start_with(
        manifest: &Manifest,
        opts: &StartOptions,
    ) -> Result<Self, CoordinatorError> {
        check_listen_auth(manifest)?;
        scfm_common::install_crypto_provider();
        let store = Store::open(&manifest.checkpoint.url)?;
        if opts.fresh {
            let n = discard_all(&store).await?;
            tracing::info!(url = %store.url(), objects = n, "--fresh: discarded earlier checkpoints");
        }
        let recovered = match persist::load(&store).await? {
            Some(p) if p.run_id == manifest.run_id && !opts.fresh => Some(p),
            Some(p) => {
                if p.run_id == manifest.run_id {
                    tracing::info!(
                        generation = p.generation,
                        "--fresh: not adopting the workers of the coordinator state found"
                    );
                } else {
                    tracing::warn!(run = %p.run_id, "ignoring the coordinator state of another run");
                }
                // Removed, not only ignored: a stale file naming a newer generation would
                // fence this job's own workers' checkpoints until this coordinator
                // persisted its first generation over it.
                persist::clear(&store).await?;
                None
            }
            None => None,
        };
        let resume = resume_point(&store, manifest).await?;
        if let Some(p) = &recovered {
            tracing::warn!(
                generation = p.generation,
                workers = p.members.len(),
                started_at_step = p.step,
                "a coordinator of this run stopped while training: adopting its workers (they reconnect)"
            );
        } else if let Some(dir) = &resume.dir {
            tracing::info!(
                step = resume.step,
                epoch = resume.epoch,
                position = resume.position,
                checkpoint = %store.url_of(dir),
                "resuming from a verified checkpoint"
            );
        }
        if let Some(addr) = &manifest.metrics.prometheus {
            let addr: SocketAddr = addr.parse().map_err(|_| {
                CoordinatorError::Config(format!("metrics.prometheus `{addr}` is not host:port"))
            })?;
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| {
                    CoordinatorError::Config(format!(
                        "cannot serve Prometheus metrics on {addr}: {e}"
                    ))
                })?;
            tracing::info!(%addr, "Prometheus /metrics served");
        }
        // The metrics log continues: from the checkpoint's step, or as it is when adopting
        // running workers (their marks of what is written carry over).
        let start = if recovered.is_some() {
            metrics::Start::Adopt
        } else {
            metrics::Start::From(resume.step)
        };
        let sink =
            metrics::MetricsSink::open(store.clone(), manifest.training.log_every, start).await?;
        let shared = Shared::new(manifest, resume, sink, store.clone());
        if let Some(p) = &recovered {
            p.restore(&mut shared.lock());
        }
        let listener = tokio::net::TcpListener::bind(&manifest.cluster.coordinator)
            .await
            .map_err(|e| {
                CoordinatorError::Config(format!(
                    "cannot listen on {}: {e}",
                    manifest.cluster.coordinator
                ))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| CoordinatorError::Config(e.to_string()))?;
        let mut builder = Server::builder();
        if let Some(tls) = &manifest.auth.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| {
                    CoordinatorError::Config(format!("auth.tls: cannot read {}: {e}", p.display()))
                })
            };
            let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(identity))
                .map_err(|e| CoordinatorError::Config(format!("auth.tls: {e}")))?;
        }
        let svc = CoordinatorServer::with_interceptor(
            Service::new(shared.clone()),
            server::token_check(manifest.token()),
        );
        let mut rx = shared.changed.subscribe();
        let watch_shared = shared.clone();
        let shutdown = async move {
            loop {
                if watch_shared.lock().is_over() {
                    break;
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
            // Let the last responses (assignments with `finished`, heartbeats) go out.
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let server = tokio::spawn(
            builder
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown),
        );
        tokio::spawn(server::watchdog(shared.clone()));
        tracing::info!(%addr, run = %manifest.run_id, "coordinator listening");
        Ok(Coordinator {
            addr,
            shared,
            server,
            store,
        })
    }

    /// Waits for the job to end; flushes metrics; `Ok` when every worker succeeded (or
    /// checkpointed and stopped on a preemption).
    pub async fn wait(self) -> Result<Finished, CoordinatorError> {
        let mut rx = self.shared.changed.subscribe();
        let mut flush = tokio::time::interval(Duration::from_secs(5));
        let mut persisted_generation = 0;
        loop {
            let (over, running) = {
                let s = self.shared.lock();
                (s.is_over(), persist::Persisted::of(&s, &self.shared.run_id))
            };
            if over {
                break;
            }
            // A new generation: persist it so a restarted coordinator can adopt it.
            if let Some(p) = running
                && p.generation != persisted_generation
            {
                match persist::save(&self.store, &p).await {
                    Ok(()) => persisted_generation = p.generation,
                    Err(e) => tracing::warn!(error = %e, "could not persist the coordinator state"),
                }
            }
            let flush_now = tokio::select! {
                r = rx.changed() => if r.is_err() { break } else { false },
                _ = flush.tick() => true,
                () = self.shared.metrics.flush_requested() => true,
            };
            if flush_now && let Err(e) = self.shared.metrics.flush().await {
                tracing::warn!(error = %e, "could not write the metrics log (kept, and tried again)");
            }
        }
        self.shared.metrics.flush().await?;
        if let Err(e) = persist::clear(&self.store).await {
            tracing::warn!(error = %e, "could not remove the coordinator state");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
        let phase = self.shared.lock().phase.clone();
        match phase {
            Phase::Done => {
                let s = self.shared.lock();
                Ok(Finished {
                    step: self.shared.metrics.last_step(),
                    preempted: s.preempted,
                    started: s.generation > 0,
                })
            }
            Phase::Failed(why) => Err(CoordinatorError::JobFailed(why)),
            other => Err(CoordinatorError::JobFailed(format!(
                "ended in phase {other:?}"
            ))),
        }
    }

    /// Fails the job from outside (e.g. a worker process exited).
    pub fn fail(&self, why: String) {
        self.shared.lock().fail(why);
        self.shared.changed.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(addr: &str, auth: &str) -> Manifest {
        let text = format!(
            "run_id: t\ndata: {{path: d.h5ad}}\ncluster: {{max_workers: 1, coordinator: '{addr}'}}\ncheckpoint: {{url: ckpt}}\n{auth}"
        );
        Manifest::parse(&text, std::path::Path::new("job.yaml")).unwrap()
    }

    #[test]
    fn only_loopback_addresses_listen_without_a_token() {
        for addr in ["127.0.0.1:0", "127.0.0.1:7000", "[::1]:7000"] {
            check_listen_auth(&manifest(addr, "")).unwrap();
        }
        for addr in ["0.0.0.0:7000", "10.1.2.3:0", "[::]:7000"] {
            let e = check_listen_auth(&manifest(addr, ""))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("not a loopback address")
                    && e.contains("the manifest has no token")
                    && e.contains("token_env: SCFM_TOKEN"),
                "{e}"
            );
            check_listen_auth(&manifest(addr, "auth: {token: s3cret}\n")).unwrap();
            let e = check_listen_auth(&manifest(addr, "auth: {token: ''}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("its token is empty"), "{e}");
        }
    }
}
