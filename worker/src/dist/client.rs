//! The worker's client of the coordinator: the connection (TLS, token), registration
//! and the assignment long-poll, each with its deadline, and which refusals are final.

use std::time::{Duration, Instant};

use scfm_common::rpc::{Assignment, TOKEN_HEADER, pb};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use super::JoinArgs;
use crate::error::{Result, WorkerError};

/// Adds the job's token to every call.
#[derive(Clone)]
pub(super) struct TokenInterceptor(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(TOKEN_HEADER, t.clone());
        }
        Ok(req)
    }
}

/// A coordinator client that sends the job's token.
pub(super) type Client = pb::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<Channel, TokenInterceptor>,
>;

/// This machine's host name, for the coordinator's logs and `scfm status`: the kernel's
/// (`/proc/sys/kernel/hostname`), else `$HOSTNAME` (which shells set but rarely export),
/// else `unknown`.
pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

/// Whether a failed call to the coordinator may succeed when tried again: "not yet"
/// (`Unavailable`), or the connection failed under it (a transport error, which tonic
/// reports as `Unknown`, e.g. when the coordinator's HTTP/2 layer reset the connection
/// after a partition healed). Refusals (authentication, protocol version, the job failed)
/// and "dropped" (`NotFound`) are final.
pub(super) fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// A refusal of the coordinator as this crate's error, naming the call.
pub(super) fn status_err(what: &str, s: Status) -> WorkerError {
    WorkerError::Coordinator(format!("{what}: {} ({:?})", s.message(), s.code()))
}

/// An error with its sources, `a: b: c`.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Connects to the coordinator, retrying with backoff until `deadline`.
pub(super) async fn connect(args: &JoinArgs, deadline: Instant) -> Result<Client> {
    let mut ep = Endpoint::from_shared(args.coordinator.clone())
        .map_err(|e| {
            WorkerError::Coordinator(format!("bad coordinator URL `{}`: {e}", args.coordinator))
        })?
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &args.tls_ca {
        let pem = std::fs::read(ca).map_err(|e| {
            WorkerError::Coordinator(format!("cannot read CA {}: {e}", ca.display()))
        })?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(
                args.tls_domain
                    .clone()
                    .unwrap_or_else(|| "localhost".into()),
            );
        ep = ep
            .tls_config(tls)
            .map_err(|e| WorkerError::Coordinator(format!("TLS: {e}")))?;
    }
    let token = match &args.token {
        Some(t) => Some(
            t.parse()
                .map_err(|_| WorkerError::Coordinator("the token is not valid ASCII".into()))?,
        ),
        None => None,
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        match ep.connect().await {
            Ok(ch) => {
                return Ok(pb::coordinator_client::CoordinatorClient::with_interceptor(
                    ch,
                    TokenInterceptor(token),
                ));
            }
            Err(e) if Instant::now() + backoff < deadline => {
                let chain = error_chain(&e);
                tracing::warn!(error = %chain, url = %args.coordinator, "coordinator not reachable yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(WorkerError::Coordinator(format!(
                    "cannot reach {}: {e}",
                    args.coordinator
                )));
            }
        }
    }
}

/// How long a worker asks again for a place that is held by workers a restarted
/// coordinator took over and that may be dead (it drops them after its worker timeout).
pub(super) const REGISTER_WAIT: Duration = Duration::from_secs(300);

/// Registers with the coordinator. A refusal the coordinator marks as temporary
/// (`UNAVAILABLE`: the places are held by workers it took over from a previous coordinator
/// and has not heard from yet), or a connection broken under the call, is asked again,
/// with backoff, until `deadline`.
pub(super) async fn register(
    client: &mut Client,
    request: pb::RegisterRequest,
    deadline: Instant,
) -> Result<pb::RegisterResponse> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match tokio::time::timeout(Duration::from_secs(30), client.register(request.clone())).await
        {
            Err(_) => return Err(WorkerError::Coordinator("registration timed out".into())),
            Ok(Ok(r)) => return Ok(r.into_inner()),
            Ok(Err(s)) if transient(&s) && Instant::now() + backoff < deadline => {
                tracing::warn!("registration deferred: {}", s.message());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Ok(Err(s)) => return Err(status_err("registration refused", s)),
        }
    }
}

/// Asks for this worker's place in the next generation after `after_generation` until
/// `deadline`; a dropped worker gets [`WorkerError::Ended`].
pub(super) async fn await_assignment(
    client: &mut Client,
    worker_id: &str,
    after_generation: u64,
    deadline: Instant,
) -> Result<Assignment> {
    loop {
        let req = pb::AssignmentRequest {
            worker_id: worker_id.to_string(),
            after_generation,
        };
        // The coordinator answers within ~10 s ("not yet" or an assignment).
        match tokio::time::timeout(Duration::from_secs(30), client.get_assignment(req)).await {
            Ok(Ok(r)) => return Ok(Assignment::try_from(r.into_inner())?),
            Ok(Err(s)) if transient(&s) && Instant::now() < deadline => {
                tracing::info!("{}", s.message());
                // Not a busy loop when the coordinator answers "not yet" at once.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(s)) if s.code() == Code::NotFound => {
                return Err(WorkerError::Ended(format!(
                    "the coordinator dropped this worker: {}",
                    s.message()
                )));
            }
            Ok(Err(s)) => return Err(status_err("no assignment", s)),
            Err(_) if Instant::now() < deadline => {
                tracing::warn!("assignment request timed out; retrying")
            }
            Err(_) => {
                return Err(WorkerError::Coordinator(
                    "no assignment before the join deadline".into(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_not_yet_and_broken_connections_are_asked_again() {
        for code in [Code::Unavailable, Code::Unknown, Code::Cancelled] {
            assert!(transient(&Status::new(code, "x")), "{code:?}");
        }
        for code in [
            Code::NotFound,
            Code::Unauthenticated,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::InvalidArgument,
            Code::ResourceExhausted,
        ] {
            assert!(!transient(&Status::new(code, "x")), "{code:?}");
        }
    }
}
