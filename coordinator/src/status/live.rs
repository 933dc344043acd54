//! The status of a running job: what the coordinator answers to `Status` (membership and
//! generation from its state, losses and step rate from the metrics it aggregates, the
//! checkpoint from `latest.json`), and the client `scfm status http://HOST:PORT` uses.

use std::time::{Duration, SystemTime};

use scfm_common::checkpoint::{LATEST, Latest};
use scfm_common::rpc::{PROTOCOL_VERSION, TOKEN_HEADER, pb};
use scfm_common::storage::Store;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use super::{CheckpointStatus, JobStatus, RunState};
use crate::error::CoordinatorError;
use crate::server::Shared;
use crate::state::Phase;

/// How long the coordinator waits for `latest.json` while answering.
const STORE_DEADLINE: Duration = Duration::from_secs(3);

/// The newest checkpoint under `store` (from `latest.json`, its age from the object's
/// modification time); `Ok(None)` when there is none.
pub async fn latest_checkpoint(
    store: &Store,
) -> Result<Option<CheckpointStatus>, CoordinatorError> {
    let Some(t) = store.get_tail_opt(LATEST, 1 << 20).await? else {
        return Ok(None);
    };
    let l: Latest = serde_json::from_slice(&t.bytes).map_err(|e| {
        CoordinatorError::Checkpoint(format!("{}: malformed: {e}", store.url_of(LATEST)))
    })?;
    let age_s = SystemTime::now()
        .duration_since(t.modified)
        .ok()
        .map(|d| d.as_secs_f64());
    Ok(Some(CheckpointStatus {
        step: l.step,
        url: store.url_of(&l.dir),
        age_s,
    }))
}

/// The coordinator's view of its job (`source` is left empty: the client names it).
pub async fn snapshot(shared: &Shared) -> JobStatus {
    let mut st = {
        let s = shared.lock();
        let (state, detail) = match &s.phase {
            Phase::Joining => (
                RunState::Joining,
                Some(format!(
                    "{} of {} workers joined (training starts with {} after the join timeout)",
                    s.workers.len(),
                    s.max_workers,
                    s.min_workers
                )),
            ),
            Phase::Running if s.preempt_at.is_some() => (
                RunState::Preempting,
                Some("preemption requested: workers checkpoint at the next step and stop".into()),
            ),
            Phase::Running if s.holding => (
                RunState::Holding,
                Some(format!(
                    "{} workers alive, fewer than min_workers ({}): state checkpointed, waiting for workers",
                    s.workers.len(),
                    s.min_workers
                )),
            ),
            Phase::Running => (
                RunState::Running,
                s.reform
                    .as_ref()
                    .map(|r| format!("membership changes: {}", r.reason)),
            ),
            Phase::Done if s.preempted => (RunState::Preempted, None),
            Phase::Done => (RunState::Finished, None),
            Phase::Failed(why) => (RunState::Failed, Some(why.clone())),
        };
        let mut st = JobStatus::new(String::new(), state);
        st.detail = detail;
        st.workers_alive = Some(s.workers.len() as u32);
        st.world_size = Some(s.members.len() as u32);
        st.generation = Some(s.generation);
        st
    };
    st.run_id = Some(shared.run_id.clone());
    st.step = shared.resume.step;
    let p = shared.metrics.progress();
    if let Some(l) = &p.last {
        st.step = st.step.max(l.step);
        st.set_last_step(l);
    } else {
        st.epoch = Some(shared.resume.epoch);
    }
    if let Some((step, v)) = p.val {
        (st.val_step, st.val_loss) = (Some(step), Some(v));
    }
    if st.state == RunState::Running
        && let (Some(total), Some(rate)) = (st.total_steps, p.steps_per_s)
    {
        st.eta_s = Some(total.saturating_sub(st.step) as f64 / rate);
    }
    match tokio::time::timeout(STORE_DEADLINE, latest_checkpoint(&shared.store)).await {
        Ok(Ok(c)) => st.checkpoint = c,
        Ok(Err(e)) => note(&mut st, format!("cannot read the latest checkpoint: {e}")),
        Err(_) => note(
            &mut st,
            format!(
                "{} did not answer within {STORE_DEADLINE:?}",
                shared.store.url_of(LATEST)
            ),
        ),
    }
    st
}

fn note(st: &mut JobStatus, what: String) {
    st.detail = Some(match st.detail.take() {
        Some(d) => format!("{d}; {what}"),
        None => what,
    });
}

/// How to reach a coordinator.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Shared token.
    pub token: Option<String>,
    /// CA certificate (PEM) to verify an `https://` coordinator with.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Server name in the coordinator's certificate (default `localhost`).
    pub tls_domain: Option<String>,
    /// Deadline of the connection and of the request, each.
    pub timeout: Duration,
}

/// Asks the coordinator at `url` (`http://host:port` or `https://…`) for its job's
/// status; errors name the address and what went wrong (unreachable, wrong token, …).
pub async fn query(url: &str, opts: &ClientOptions) -> Result<JobStatus, CoordinatorError> {
    let err = |message: String| CoordinatorError::Rpc {
        addr: url.to_string(),
        message,
    };
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| err(format!("not a coordinator URL: {e}")))?
        .connect_timeout(opts.timeout)
        .timeout(opts.timeout);
    if let Some(ca) = &opts.tls_ca {
        let pem = std::fs::read(ca)
            .map_err(|e| err(format!("cannot read the CA {}: {e}", ca.display())))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(opts.tls_domain.as_deref().unwrap_or("localhost"));
        ep = ep.tls_config(tls).map_err(|e| err(format!("TLS: {e}")))?;
    }
    let secs = opts.timeout.as_secs_f64();
    let channel = match tokio::time::timeout(opts.timeout, ep.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(err(format!("cannot connect: {}", error_chain(&e)))),
        Err(_) => return Err(err(format!("no connection within {secs} s"))),
    };
    let mut req = tonic::Request::new(pb::StatusRequest {
        protocol_version: PROTOCOL_VERSION,
    });
    req.set_timeout(opts.timeout);
    if let Some(t) = &opts.token {
        let v = MetadataValue::try_from(t.as_str())
            .map_err(|_| err("the token is not valid ASCII".into()))?;
        req.metadata_mut().insert(TOKEN_HEADER, v);
    }
    let mut client = pb::coordinator_client::CoordinatorClient::new(channel);
    let answer = match tokio::time::timeout(opts.timeout, client.status(req)).await {
        Ok(r) => r,
        Err(_) => return Err(err(format!("no answer within {secs} s"))),
    };
    match answer {
        Ok(r) => Ok(JobStatus::from_pb(r.into_inner(), url)),
        Err(s) if s.code() == tonic::Code::Unauthenticated => Err(err(format!(
            "refused: {} (pass the job's token with --token or SCFM_TOKEN)",
            s.message()
        ))),
        Err(s) if s.code() == tonic::Code::Unimplemented => Err(err(format!(
            "no status service there ({}): not an scfm coordinator, or an older one",
            s.message()
        ))),
        Err(s) => Err(err(format!("{} ({:?})", s.message(), s.code()))),
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Layers often repeat their source's words ("tcp connect error: tcp connect error").
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
