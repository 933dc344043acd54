//! The coordinator's gRPC service: registration (token + protocol version), heartbeats,
//! assignments (long-poll with a deadline), metrics, completion; plus the watchdog that
//! starts the job and detects dead workers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use scfm_common::checkpoint::ResumePoint;
use scfm_common::manifest::Manifest;
use scfm_common::metrics_log::Record;
use scfm_common::rpc::{PROTOCOL_VERSION, TOKEN_HEADER, pb, token_matches};
use scfm_common::storage::Store;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::metrics::{MetricsSink, Taken};
use crate::state::{JobState, Phase, Refusal};

/// How long one long-polling call (GetAssignment, ExchangeNcclId) waits before answering
/// "not yet".
const LONG_POLL: Duration = Duration::from_secs(10);

/// State shared by the service and the watchdog.
pub struct Shared {
    /// Job state.
    pub state: Mutex<JobState>,
    /// Bumped whenever the state changes (generation, phase).
    pub changed: watch::Sender<u64>,
    /// The manifest handed to workers.
    pub manifest_yaml: String,
    /// Run id.
    pub run_id: String,
    /// Heartbeat interval for workers.
    pub heartbeat_ms: u64,
    /// Where the run starts (step, data cursor, checkpoint directory).
    pub resume: ResumePoint,
    /// Metrics aggregation.
    pub metrics: MetricsSink,
    /// How long workers get to checkpoint and stop after a preemption.
    pub preempt_grace: Duration,
    /// The run's checkpoint store (`latest.json` for status requests).
    pub store: Store,
}

impl Shared {
    /// Builds the shared state for a manifest, resume cursor and checkpoint store.
    pub fn new(m: &Manifest, resume: ResumePoint, metrics: MetricsSink, store: Store) -> Arc<Self> {
        let c = &m.cluster;
        let state = JobState::new(
            c.min_workers,
            c.max_workers,
            Duration::from_secs(c.join_timeout_s),
            Duration::from_secs(c.worker_timeout_s),
        );
        Arc::new(Shared {
            state: Mutex::new(state),
            changed: watch::channel(0).0,
            manifest_yaml: m.to_yaml(),
            run_id: m.run_id.clone(),
            heartbeat_ms: c.heartbeat_ms,
            resume,
            metrics,
            preempt_grace: Duration::from_secs(c.preempt_grace_s),
            store,
        })
    }

    /// Asks every worker to checkpoint at the next step boundary and stop (SIGTERM).
    pub fn preempt(&self) {
        {
            let mut s = self.lock();
            if s.is_over() || s.preempt_at.is_some() {
                return;
            }
            s.preempt_at = Some(Instant::now());
            if s.phase == Phase::Joining {
                // Nothing trained yet, so nothing to checkpoint: the job ends preempted
                // (exit 0); workers that joined are told to stop, and the same manifest
                // runs again from where the checkpoints are.
                s.phase = Phase::Done;
                s.preempted = true;
            }
        }
        tracing::warn!("preemption requested: workers checkpoint at the next step and stop");
        self.notify();
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Locks the state (a poisoned lock means a bug elsewhere already panicked).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    /// Wraps shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Service { shared }
    }
}

/// An interceptor that refuses requests without the shared token (logging the refusal).
pub fn token_check(
    token: Option<String>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let Some(want) = &token else { return Ok(req) };
        // Compared in constant time: a timing side channel must not reveal the token.
        let got = req.metadata().get(TOKEN_HEADER).map(|v| v.as_bytes());
        if got.is_some_and(|g| token_matches(g, want.as_bytes())) {
            Ok(req)
        } else {
            let peer = req.remote_addr().map_or("?".to_string(), |a| a.to_string());
            tracing::warn!(%peer, "refused a request with a wrong or missing token");
            Err(Status::unauthenticated("wrong or missing token"))
        }
    }
}

fn check_version(v: u32, peer: Option<SocketAddr>) -> Result<(), Status> {
    if v != PROTOCOL_VERSION {
        tracing::warn!(peer = ?peer, version = v, "refused a client with another protocol version");
        return Err(Status::failed_precondition(format!(
            "protocol version {v} does not match the coordinator's {PROTOCOL_VERSION}"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Service {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let peer = req.remote_addr();
        let r = req.into_inner();
        check_version(r.protocol_version, peer)?;
        let ring: SocketAddr = r.ring_addr.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "ring_addr `{}` is not a socket address",
                r.ring_addr
            ))
        })?;
        let id = {
            let mut s = self.shared.lock();
            let id = s
                .register(ring, r.hostname.clone(), r.device.clone(), r.pid)
                .map_err(|e| match e {
                    Refusal::Full(n) => {
                        Status::resource_exhausted(format!("the cluster is full ({n} workers)"))
                    }
                    Refusal::FullOfAdopted(n, a) => Status::unavailable(format!(
                        "the cluster is full ({n} workers), {a} of them taken over from a previous coordinator and not heard from yet; they are dropped after {} s of silence: ask again",
                        s.worker_timeout.as_secs()
                    )),
                    Refusal::Over => Status::failed_precondition("the job is over"),
                })?;
            s.maybe_start(Instant::now(), &self.shared.resume);
            id
        };
        tracing::info!(worker = %id, ring = %ring, host = %r.hostname, device = %r.device, pid = r.pid, "worker joined");
        self.shared.notify();
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id,
            run_id: self.shared.run_id.clone(),
            manifest_yaml: self.shared.manifest_yaml.clone(),
            heartbeat_ms: self.shared.heartbeat_ms,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let peer = req.remote_addr();
        let r = req.into_inner();
        check_version(r.protocol_version, peer)?;
        let mut s = self.shared.lock();
        if !s.heartbeat(&r.worker_id, r.step, Instant::now()) {
            return Err(Status::not_found(format!(
                "unknown worker `{}` (lost: it was silent or left the job)",
                r.worker_id
            )));
        }
        let order = if s.is_over() {
            pb::Order::Stop
        } else if s.must_abort(&r.worker_id, r.generation) {
            // Before a preemption: a generation that lost a member cannot reach a step
            // boundary; the next one checkpoints.
            pb::Order::Abort
        } else if s.preempt_at.is_some() {
            pb::Order::Preempt
        } else if s.must_reform(&r.worker_id, r.generation) {
            pb::Order::Reform
        } else {
            pb::Order::Continue
        };
        Ok(Response::new(pb::HeartbeatResponse {
            generation: s.generation,
            order: order as i32,
        }))
    }

    async fn get_assignment(
        &self,
        req: Request<pb::AssignmentRequest>,
    ) -> Result<Response<pb::AssignmentResponse>, Status> {
        let r = req.into_inner();
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        let mut noted = false;
        loop {
            {
                let mut s = self.shared.lock();
                if !s.workers.contains_key(&r.worker_id) {
                    return Err(Status::not_found(format!(
                        "unknown worker `{}`",
                        r.worker_id
                    )));
                }
                if let Phase::Failed(why) = &s.phase {
                    return Err(Status::aborted(format!("job failed: {why}")));
                }
                // Over (e.g. preempted while holding): nothing more to train.
                if s.phase == Phase::Done
                    && let Some(mut a) = s.base.clone()
                {
                    a.finished = true;
                    return Ok(Response::new((&a).into()));
                }
                if s.generation > r.after_generation
                    && let Some(a) = s.assignment_for(&r.worker_id)
                {
                    return Ok(Response::new((&a).into()));
                }
                // Not in the current generation (a joiner), or done with it: it waits
                // for the next one.
                if !noted && s.phase == Phase::Running {
                    s.wants_next(&r.worker_id);
                    noted = true;
                    drop(s);
                    self.shared.notify();
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Status::unavailable("coordinator shutting down")),
                Err(_) => {
                    let s = self.shared.lock();
                    let msg = if s.phase == Phase::Running {
                        format!(
                            "waiting for the next generation: {} workers alive (min {})",
                            s.workers.len(),
                            s.min_workers
                        )
                    } else {
                        format!(
                            "waiting for workers: {} of {} joined (min {})",
                            s.workers.len(),
                            s.max_workers,
                            s.min_workers
                        )
                    };
                    return Err(Status::unavailable(msg));
                }
            }
        }
    }

    type StreamMetricsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::MetricsAck, Status>> + Send + 'static>,
    >;

    async fn stream_metrics(
        &self,
        req: Request<tonic::Streaming<pb::StepMetrics>>,
    ) -> Result<Response<Self::StreamMetricsStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(metrics_stream(self.shared.clone(), req.into_inner(), tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn report_done(
        &self,
        req: Request<pb::DoneRequest>,
    ) -> Result<Response<pb::DoneResponse>, Status> {
        let r = req.into_inner();
        {
            let mut s = self.shared.lock();
            if r.failed && !s.workers.contains_key(&r.worker_id) {
                // A worker the job already lost (silent past the timeout, or it left): its
                // failure is its own, usually the cut that lost it, and the job went on
                // without it.
                tracing::warn!(worker = %r.worker_id, step = r.step, error = %r.error,
                    "a worker no longer in the job reported a failure; the job goes on");
            } else if r.failed {
                tracing::error!(worker = %r.worker_id, step = r.step, error = %r.error, "worker failed");
                s.fail(format!(
                    "worker {} failed at step {}: {}",
                    r.worker_id, r.step, r.error
                ));
            } else {
                tracing::info!(worker = %r.worker_id, step = r.step, "worker finished");
                if r.preempted {
                    s.preempted = true;
                }
                s.done(&r.worker_id);
            }
        }
        self.shared.notify();
        Ok(Response::new(pb::DoneResponse {}))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        check_version(req.get_ref().protocol_version, req.remote_addr())?;
        let s = crate::status::live::snapshot(&self.shared).await;
        Ok(Response::new((&s).into()))
    }

    async fn exchange_nccl_id(
        &self,
        req: Request<pb::NcclIdRequest>,
    ) -> Result<Response<pb::NcclIdResponse>, Status> {
        let r = req.into_inner();
        let publish = (!r.id.is_empty()).then_some(r.id);
        let publishing = publish.is_some();
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        let mut publish = publish;
        loop {
            let got = {
                let mut s = self.shared.lock();
                s.exchange_nccl_id(&r.worker_id, r.generation, publish.take())
                    .map_err(|e| {
                        tracing::warn!(worker = %r.worker_id, error = %e, "NCCL id exchange refused");
                        Status::failed_precondition(e.to_string())
                    })?
            };
            if publishing {
                self.shared.notify();
            }
            if let Some(id) = got {
                return Ok(Response::new(pb::NcclIdResponse { id }));
            }
            // Not published yet: wait for a change (rank 0 publishing), up to the deadline.
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Status::unavailable("coordinator shutting down")),
                Err(_) => return Ok(Response::new(pb::NcclIdResponse { id: Vec::new() })),
            }
        }
    }
}

/// One worker's metrics stream: records its reports and answers with the worker's mark
/// of what is written whenever a flush moved it. When the worker closes its side, a flush
/// is asked for at once and the stream ends once all it sent is acknowledged. A backlog
/// that cannot be written ends the stream with UNAVAILABLE: the worker keeps its reports
/// and sends them again.
async fn metrics_stream(
    shared: Arc<Shared>,
    mut inbound: tonic::Streaming<pb::StepMetrics>,
    tx: tokio::sync::mpsc::Sender<Result<pb::MetricsAck, Status>>,
) {
    use tokio_stream::StreamExt;
    let sink = &shared.metrics;
    let mut flushed = sink.subscribe();
    let mut worker: Option<String> = None;
    let mut acked: Option<(u64, u64)> = None;
    let mut open = true;
    loop {
        tokio::select! {
            m = inbound.next(), if open => match m {
                Some(Ok(m)) => {
                    if worker.is_none() {
                        worker = Some(m.worker_id.clone());
                    }
                    if sink.record(&m) == Taken::Full {
                        tracing::warn!(worker = %m.worker_id, "metrics backlog full (the checkpoint store is failing?): the worker keeps its reports and sends them again");
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "the coordinator's metrics backlog is full: send again later",
                            )))
                            .await;
                        return;
                    }
                }
                Some(Err(_)) => return,
                None => {
                    open = false;
                    sink.request_flush();
                }
            },
            r = flushed.changed() => if r.is_err() { return },
            () = tx.closed() => return,
        }
        let Some(w) = &worker else {
            if open {
                continue;
            }
            return;
        };
        let mark = sink.durable_mark(w);
        if let Some((generation, step)) = mark
            && mark != acked
        {
            if tx
                .send(Ok(pb::MetricsAck { generation, step }))
                .await
                .is_err()
            {
                return;
            }
            acked = mark;
        }
        if !open && acked == sink.received_mark(w) {
            return;
        }
    }
}

/// Starts the job when the join timeout passes, loses workers that go silent and forms
/// new generations (see `reform.rs`), and fails the job when too few workers remain for
/// too long.
pub async fn watchdog(shared: Arc<Shared>) {
    // A worker that still trains in a dead generation keeps heartbeating; one silent for
    // this long while the others wait for the next generation is lost.
    let silence = (Duration::from_millis(shared.heartbeat_ms) * 5)
        .max(Duration::from_secs(3))
        .min(shared.lock().worker_timeout);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let mut changed = false;
        {
            let mut s = shared.lock();
            if s.is_over() {
                break;
            }
            let now = Instant::now();
            if s.maybe_start(now, &shared.resume) {
                tracing::info!(
                    generation = s.generation,
                    workers = s.members.len(),
                    "training starts"
                );
                changed = true;
            }
            if let Some(why) = s.join_expired(now) {
                tracing::error!("{why}");
                s.fail(why);
                changed = true;
            }
            if s.preempt_at.is_some() && s.preempt_while_idle() {
                tracing::warn!(
                    "preempted while no generation trains (holding below min_workers, its state checkpointed): stopping"
                );
                changed = true;
            }
            if s.preempt_at
                .is_some_and(|t| now.duration_since(t) > shared.preempt_grace)
            {
                let why = format!(
                    "workers did not checkpoint and stop within the preemption grace period ({} s)",
                    shared.preempt_grace.as_secs()
                );
                tracing::error!("{why}");
                s.fail(why);
                changed = true;
            }
            for dead in s.dead_workers(now) {
                let why = format!("no heartbeat for {} s", s.worker_timeout.as_secs());
                s.lose(&dead, &why);
                changed = true;
            }
            if s.maybe_reform(now, silence) {
                if let Some((at, took)) = s.last_reform {
                    shared.metrics.generation_formed(s.generation, at - took);
                }
                shared.metrics.event(&Record::Generation {
                    generation: s.generation,
                    world_size: s.members.len() as u64,
                    hold: s.holding,
                    ready_after_s: s.last_reform.map_or(0.0, |(_, d)| d.as_secs_f64()),
                });
                changed = true;
            }
            if let Some(why) = s.short_expired(now) {
                tracing::error!("{why}");
                s.fail(why);
                changed = true;
            }
        }
        if changed {
            shared.notify();
        }
    }
    shared.notify();
}
