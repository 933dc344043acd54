//! `scfm-worker join`: a cluster worker. Registers with the coordinator (token, protocol
//! version, ring address), heartbeats in the background, waits for its assignment, forms
//! the ring with its peers, trains its slice of every global batch, streams per-step
//! metrics, and reports completion or failure. Every network wait has a deadline.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use scfm_common::manifest::Manifest;
use scfm_common::rpc::{PROTOCOL_VERSION, pb};
use scfm_common::runtime::Rt;

use crate::collective::{RingAbort, RingCollective, RingConfig, RingKey, RingTls};
use crate::control::Control;
use crate::error::{Result, WorkerError};
use crate::trainer::{RunOptions, RunSummary, StepReport, Trainer, WorkerContext};

mod backend;
mod client;
mod heartbeat;
mod metrics;

use client::{Client, REGISTER_WAIT, await_assignment, connect, host_name, register};
use metrics::{FINAL_ACK_WAIT, forward_metrics, to_pb};

/// The ring of the current generation, breakable from the heartbeat task.
type AbortSlot = Arc<std::sync::Mutex<Option<(u64, RingAbort)>>>;

/// How to reach the coordinator.
#[derive(Debug, Clone)]
pub struct JoinArgs {
    /// Coordinator URL (`http://host:port`, or `https://` with TLS).
    pub coordinator: String,
    /// Shared token.
    pub token: Option<String>,
    /// Host to bind the ring listener on (peers connect to it).
    pub bind: String,
    /// CA certificate (PEM) to verify the coordinator with (TLS).
    pub tls_ca: Option<std::path::PathBuf>,
    /// Server name in the coordinator's certificate.
    pub tls_domain: Option<String>,
    /// PEM certificate chain this worker presents to its left ring neighbour when the job
    /// runs its ring over TLS (`auth.tls.ring`): the job's `auth.tls.cert`.
    pub ring_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of [`JoinArgs::ring_tls_cert`]: the job's `auth.tls.key`.
    pub ring_tls_key: Option<std::path::PathBuf>,
}

/// How long a worker keeps trying to report its completion (the coordinator may be
/// restarting).
const DONE_RETRY: Duration = Duration::from_secs(60);

/// How long a worker whose job ended waits for the last metrics acknowledgements.
const ENDED_ACK_WAIT: Duration = Duration::from_secs(3);
/// How long a worker whose job ended waits for a checkpoint upload under way to land
/// (at most its checkpoint grace).
const ENDED_UPLOAD_WAIT: Duration = Duration::from_secs(10);

/// The key of the job's ring: derived from the token and the run id when the job has a
/// token (the coordinator accepted this worker's, so every member holds the same), from
/// the run id alone when it has none (a loopback job; the key is then not secret).
fn ring_key(m: &Manifest, token: Option<&str>, run_id: &str) -> Result<RingKey> {
    if !m.has_token() {
        return Ok(RingKey::derive(None, run_id));
    }
    match token {
        Some(t) => Ok(RingKey::derive(Some(t), run_id)),
        None => Err(WorkerError::Coordinator(
            "the job has a token (auth in its manifest) but this worker was given none: set \
             SCFM_TOKEN or pass --token"
                .into(),
        )),
    }
}

/// The ring's TLS settings when the job runs its ring over TLS (`auth.tls.ring`): the
/// certificate and key of `--ring-tls-cert` and `--ring-tls-key`, verified against
/// `--tls-ca` for `--tls-domain` (default: the manifest's `auth.tls.domain`, else
/// `localhost`). An error names the missing flag, or the flag whose file cannot be read,
/// or the files when they cannot be used.
fn ring_tls(m: &Manifest, args: &JoinArgs) -> Result<Option<RingTls>> {
    let Some(tls) = m.auth.tls.as_ref().filter(|t| t.ring) else {
        return Ok(None);
    };
    let config = |field: &str, message: String| scfm_common::Error::config(field, message);
    let read = |path: &Option<std::path::PathBuf>, flag: &str| -> Result<Vec<u8>> {
        let path = path.as_deref().ok_or_else(|| {
            config(
                flag,
                "the job runs its ring over TLS (auth.tls.ring in its manifest) but this \
                 worker was given none"
                    .into(),
            )
        })?;
        std::fs::read(path)
            .map_err(|e| config(flag, format!("cannot read {}: {e}", path.display())).into())
    };
    let cert = read(&args.ring_tls_cert, "--ring-tls-cert")?;
    let key = read(&args.ring_tls_key, "--ring-tls-key")?;
    let ca = read(&args.tls_ca, "--tls-ca")?;
    let domain = args
        .tls_domain
        .as_deref()
        .or(tls.domain.as_deref())
        .unwrap_or("localhost");
    let tls = RingTls::from_pem(&cert, &key, &ca, domain).map_err(|e| {
        config(
            "auth.tls.ring",
            format!(
                "{e} (the files of --ring-tls-cert, --ring-tls-key and --tls-ca, server \
                 name {domain})"
            ),
        )
    })?;
    Ok(Some(tls))
}

/// Joins the cluster and trains until the job ends; the coordinator connection, the
/// heartbeat and the metrics stream run on `rt`, and `control` carries the stop requests
/// (signals, the coordinator's orders). [`WorkerError::Ended`] when the coordinator ended
/// the job or dropped this worker (after the normal shutdown: the last checkpoint upload
/// waited for briefly, the metrics stream closed).
pub fn join(args: &JoinArgs, rt: &Rt, control: &Control) -> Result<Option<RunSummary>> {
    scfm_common::install_crypto_provider();
    let listener = TcpListener::bind((args.bind.as_str(), 0)).map_err(|e| {
        WorkerError::Coordinator(format!("cannot bind a ring socket on {}: {e}", args.bind))
    })?;
    let ring_addr = listener
        .local_addr()
        .map_err(|e| WorkerError::Internal(e.to_string()))?;
    let mut client = rt.block_on(connect(args, Instant::now() + Duration::from_secs(60)))?;
    let device = if tch::Cuda::is_available() {
        "cuda:0"
    } else {
        "cpu"
    };
    let request = pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        ring_addr: ring_addr.to_string(),
        hostname: host_name(),
        pid: std::process::id(),
        device: device.into(),
    };
    let reg = rt.block_on(register(
        &mut client,
        request,
        Instant::now() + REGISTER_WAIT,
    ))?;
    let id = reg.worker_id.clone();
    let manifest = Manifest::parse(&reg.manifest_yaml, std::path::Path::new("<coordinator>"))?;
    let spec = manifest.train_spec()?;
    let ring_key = ring_key(&manifest, args.token.as_deref(), &reg.run_id)?;
    let ring_tls = ring_tls(&manifest, args)?;
    if !manifest.has_token() && !ring_addr.ip().is_loopback() {
        tracing::warn!(ring = %ring_addr, "the job has no token: the ring's key derives from the run id alone and is no secret to anyone who reaches this address; give the job a token (auth.token_env)");
    }
    tracing::info!(worker = %id, run = %reg.run_id, ring = %ring_addr, "registered");

    // Heartbeats from the first moment: the coordinator may wait long for the others.
    let step = Arc::new(AtomicU64::new(0));
    let generation = Arc::new(AtomicU64::new(0));
    let abort: AbortSlot = Arc::default();
    let hb = heartbeat::spawn(
        rt,
        heartbeat::Beat {
            client: client.clone(),
            id: id.clone(),
            every: Duration::from_millis(reg.heartbeat_ms.max(50)),
            step: step.clone(),
            generation: generation.clone(),
            abort: abort.clone(),
            control: control.clone(),
        },
    );

    // Metrics: the trainer sends on a std channel; a task streams them to the coordinator.
    let (tx, rx) = std::sync::mpsc::channel::<StepReport>();
    let (atx, arx) = tokio::sync::mpsc::channel::<pb::StepMetrics>(1024);
    let fwd = {
        let (id, step) = (id.clone(), step.clone());
        std::thread::spawn(move || {
            while let Ok(r) = rx.recv() {
                step.store(r.stats.step, Ordering::Relaxed);
                if atx.blocking_send(to_pb(&id, r)).is_err() {
                    break;
                }
            }
        })
    };
    let stream = rt.spawn(forward_metrics(client.clone(), arx));
    let wait_for = Duration::from_secs(manifest.cluster.join_timeout_s + 60);
    let timeout = Duration::from_secs(manifest.cluster.collective_timeout_s);
    let outcome = run_generations(
        rt,
        control,
        &mut client,
        &id,
        &spec,
        listener,
        Gen {
            timeout,
            wait_for,
            reporter: tx,
            checksum_every: manifest.cluster.checksum_every,
            overlap: manifest.cluster.overlap_allreduce,
            generation: generation.clone(),
            checkpoint_url: manifest.checkpoint.url.clone(),
            run_id: reg.run_id.clone(),
            abort,
            collective: manifest.cluster.collective,
            ring_key,
            ring_tls,
            checkpoint_grace: checkpoint_grace(Duration::from_secs(
                manifest.cluster.preempt_grace_s,
            )),
        },
    );
    // Once the job ended, any failure on the way out is that end.
    let outcome = match (outcome, control.ended()) {
        (Err(e), Some(reason)) => {
            if !matches!(e, WorkerError::Ended(_)) {
                tracing::debug!(error = %e, "after the job ended");
            }
            Err(WorkerError::Ended(reason))
        }
        (o, _) => o,
    };
    let _ = fwd.join();
    // The coordinator that ended the job is going away: a short wait for the last acks.
    let ack_wait = if control.ended().is_some() {
        ENDED_ACK_WAIT
    } else {
        FINAL_ACK_WAIT + Duration::from_secs(15)
    };
    let abort_stream = stream.abort_handle();
    if rt
        .block_on(async { tokio::time::timeout(ack_wait, stream).await })
        .is_err()
    {
        abort_stream.abort();
    }
    if let Err(WorkerError::Ended(reason)) = &outcome {
        hb.abort();
        tracing::info!(reason = %reason, "the job ended for this worker: shut down (nothing reported)");
        return Err(WorkerError::Ended(reason.clone()));
    }
    let outcome = match outcome {
        Ok(None) => {
            hb.abort();
            return Ok(None);
        }
        Ok(Some(s)) => Ok(s),
        Err(e) => Err(e),
    };
    let done = match &outcome {
        Ok(s) => pb::DoneRequest {
            worker_id: id.clone(),
            step: s.steps,
            checkpoint: s.checkpoint.clone(),
            failed: false,
            error: String::new(),
            preempted: s.preempted,
        },
        Err(e) => pb::DoneRequest {
            worker_id: id.clone(),
            step: step.load(Ordering::Relaxed),
            checkpoint: String::new(),
            failed: true,
            error: e.to_string(),
            preempted: false,
        },
    };
    // The coordinator may be restarting: retry for a while.
    let reported = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + DONE_RETRY;
        loop {
            let call = tokio::time::timeout(Duration::from_secs(10), client.report_done(done.clone()));
            match call.await {
                Ok(Ok(_)) => return true,
                r if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(outcome = ?r.map(|x| x.map(|_| ())), "giving up reporting completion");
                    return false;
                }
                _ => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    });
    if !reported {
        tracing::warn!("could not report completion to the coordinator");
    }
    hb.abort();
    outcome.map(Some)
}

/// What every generation of a worker shares.
struct Gen {
    timeout: Duration,
    wait_for: Duration,
    reporter: std::sync::mpsc::Sender<StepReport>,
    checksum_every: u64,
    /// `cluster.overlap_allreduce`.
    overlap: bool,
    generation: Arc<AtomicU64>,
    checkpoint_url: String,
    /// The run id the coordinator assigned.
    run_id: String,
    abort: AbortSlot,
    /// `cluster.collective`.
    collective: scfm_common::manifest::CollectiveBackend,
    /// The job's ring key.
    ring_key: RingKey,
    /// The ring's TLS settings (`auth.tls.ring`), if it runs over TLS.
    ring_tls: Option<RingTls>,
    /// How long the end of a run waits for its last checkpoint to land.
    checkpoint_grace: Duration,
}

/// How long a worker waits for its last checkpoint to land: the preemption grace less a
/// margin (a quarter, at least 5 s), so that it reports before the coordinator gives up.
fn checkpoint_grace(preempt_grace: Duration) -> Duration {
    preempt_grace
        .saturating_sub((preempt_grace / 4).max(Duration::from_secs(5)))
        .max(Duration::from_secs(1))
}

/// Trains through the generations of an elastic cluster: for each assignment, forms the
/// ring, agrees on the state with the other members (from the second generation on),
/// and trains until the run ends, the ring breaks (a peer was lost) or the coordinator
/// asks to re-form (a worker joins); then waits for the next generation. `Ok(None)`: the
/// run was already complete.
fn run_generations(
    rt: &Rt,
    control: &Control,
    client: &mut Client,
    id: &str,
    spec: &scfm_common::config::TrainSpec,
    listener: TcpListener,
    g: Gen,
) -> Result<Option<RunSummary>> {
    // A job that asks for NCCL fails here, before anything loads, when this worker lacks it.
    let local = backend::probe(g.collective, spec.training.device)?;
    let bctx = backend::BackendCtx {
        setting: g.collective,
        device: spec.training.device,
        local: local.as_ref(),
        timeout: g.timeout,
    };
    // Data and model first, so that a worker joining a running job holds nobody up: it asks
    // for an assignment (which tells the coordinator it is ready) only once loaded.
    let placeholder = WorkerContext {
        collective: Box::new(crate::collective::LocalCollective::new()),
        reporter: Some(g.reporter.clone()),
        checksum_every: g.checksum_every,
        generation: 0,
        fence: None,
        overlap: false,
    };
    let mut trainer = Some(Trainer::with_context(
        spec.clone(),
        &RunOptions::default(),
        placeholder,
        rt,
        control,
    )?);
    if let Some(t) = trainer.as_mut() {
        t.set_checkpoint_grace(g.checkpoint_grace);
    }
    // Whether the trainer holds any state yet (from a checkpoint or a peer).
    let mut loaded = false;
    // The generation whose state the trainer holds from training (0: none).
    let mut live = 0u64;
    let mut after = 0u64;
    loop {
        if let Err(e) = control.check() {
            if let Some(t) = trainer.as_mut() {
                t.set_checkpoint_grace(g.checkpoint_grace.min(ENDED_UPLOAD_WAIT));
            }
            return Err(e);
        }
        let a = rt.block_on(await_assignment(
            client,
            id,
            after,
            Instant::now() + g.wait_for,
        ))?;
        if a.finished {
            return Ok(None);
        }
        after = a.generation;
        g.generation.store(a.generation, Ordering::Relaxed);
        tracing::info!(
            rank = a.rank,
            world = a.world_size,
            generation = a.generation,
            step = a.step,
            hold = a.hold,
            "assignment"
        );
        let ring = RingCollective::new(
            a.rank,
            a.world_size,
            a.peers.clone(),
            listener
                .try_clone()
                .map_err(|e| WorkerError::Internal(format!("ring listener: {e}")))?,
            RingConfig::new(g.ring_key.clone(), a.generation, g.timeout)
                .with_tls(g.ring_tls.clone()),
        );
        // Every rank agrees on the backend of this generation (and forms NCCL if chosen).
        let ring = match ring.map_err(Ok).and_then(|mut r| {
            backend::set_backend(&mut r, &bctx, a.generation, &mut |mine, deadline| {
                backend::exchange_nccl_id(rt, client, id, a.generation, mine, deadline)
            })
            .map(|()| r)
        }) {
            Ok(r) => Ok(r),
            Err(Ok(e)) => Err(e),
            Err(Err(fatal)) => return Err(fatal),
        };
        let ring = match ring {
            Ok(r) => {
                *g.abort.lock().unwrap_or_else(|p| p.into_inner()) =
                    r.abort_handle().map(|h| (a.generation, h));
                r
            }
            Err(e) => {
                tracing::warn!(error = %e, generation = a.generation, "could not form the ring; waiting for the next generation");
                continue;
            }
        };
        let ctx = WorkerContext {
            collective: Box::new(ring),
            reporter: Some(g.reporter.clone()),
            checksum_every: g.checksum_every,
            generation: a.generation,
            overlap: g.overlap,
            fence: Some(crate::fence::Fence {
                run_id: g.run_id.clone(),
                worker_id: id.to_string(),
                generation: a.generation,
                control: control.clone(),
            }),
        };
        let mut t = trainer
            .take()
            .ok_or_else(|| WorkerError::Internal("no trainer".into()))?;
        t.set_context(ctx);
        if !loaded {
            loaded = true;
            if let Some(dir) = &a.resume_dir {
                t.resume_from(dir)?;
            } else if a.generation > 1 {
                // Joining a running job: a peer's state follows; without survivors, the
                // newest checkpoint.
                t.resume_latest_if_any()?;
            }
            if a.generation == 1 && t.state.step != a.step {
                return Err(WorkerError::Checkpoint {
                    url: g.checkpoint_url.clone(),
                    message: format!(
                        "latest checkpoint is at step {}, the coordinator resumes at {}",
                        t.state.step, a.step
                    ),
                });
            }
        }
        if a.generation > 1
            && let Err(e) = t.sync_state(live)
        {
            if control.ended().is_some() {
                trainer = Some(t);
                continue;
            }
            let WorkerError::Collective(_) = e else {
                return Err(e);
            };
            tracing::warn!(error = %e, "agreeing on the state failed; waiting for the next generation");
            t.drop_collective();
            if t.is_tainted() {
                // Half-received: only a checkpoint can be trusted now.
                live = 0;
                if !t.resume_latest_if_any()? {
                    return Err(e);
                }
            }
            trainer = Some(t);
            continue;
        }
        live = a.generation;
        if a.hold {
            // Too few workers: keep the agreed state safe and wait for workers to return.
            if t.rank() == 0 {
                t.save()?;
                t.flush_checkpoint()?;
            }
            t.drop_collective();
            trainer = Some(t);
            continue;
        }
        let ran = t.run(&RunOptions::default());
        if control.ended().is_some() {
            // The job ended: an upload under way may land, but not for minutes.
            t.set_checkpoint_grace(g.checkpoint_grace.min(ENDED_UPLOAD_WAIT));
            trainer = Some(t);
            continue;
        }
        match ran {
            Ok(s) if s.reform => {}
            Ok(s) => return Ok(Some(s)),
            Err(WorkerError::Collective(e)) => {
                tracing::warn!(error = %e, generation = a.generation, step = t.state.step, "the ring broke (a peer was lost?); waiting for the next generation");
            }
            Err(e) => return Err(e),
        }
        t.drop_collective();
        trainer = Some(t);
    }
}
