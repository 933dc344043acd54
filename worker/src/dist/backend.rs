//! The collective backend of each generation of a cluster worker (`cluster.collective`,
//! decided by `crate::collective::backend`), and NCCL's unique-id exchange through the
//! coordinator.

use std::time::{Duration, Instant};

use scfm_common::config::Device as DeviceChoice;
use scfm_common::manifest::CollectiveBackend;

use super::Client;
use crate::collective::backend::{self, Choice, LocalNccl, Vote};
use crate::collective::{Collective, CollectiveError, RingCollective};
use crate::error::WorkerError;

/// What a generation's backend needs to know.
pub(super) struct BackendCtx<'a> {
    /// `cluster.collective`.
    pub setting: CollectiveBackend,
    /// `cluster.device`.
    pub device: DeviceChoice,
    /// This worker's NCCL capability (`None` with `ring`: never probed).
    pub local: Option<&'a LocalNccl>,
    /// The collective timeout (NCCL forms within half of it).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub timeout: Duration,
}

/// Probes NCCL at start unless the job uses the ring, logs what it found, and refuses a
/// job that asks for NCCL when this worker cannot provide it (naming why, and every place
/// NCCL was looked for).
pub(super) fn probe(
    setting: CollectiveBackend,
    device: DeviceChoice,
) -> Result<Option<LocalNccl>, WorkerError> {
    if setting == CollectiveBackend::Ring {
        tracing::info!("cluster.collective is `ring`: NCCL is not used");
        return Ok(None);
    }
    let local = LocalNccl::probe(device);
    backend::require_nccl(setting, &local).map_err(WorkerError::Backend)?;
    match &local.usable {
        Ok(what) => tracing::info!(gpu = %local.gpu_label, "NCCL usable here: {what}"),
        Err(why) => tracing::info!("NCCL not usable here: {why}"),
    }
    Ok(Some(local))
}

/// Agrees with the other ranks on this generation's backend and attaches NCCL when it is
/// chosen. `Err(Ok(e))`: the ring failed (wait for the next generation); `Err(Err(e))`:
/// `nccl` was asked for and cannot be had (the job fails).
pub(super) fn set_backend(
    ring: &mut RingCollective,
    ctx: &BackendCtx,
    generation: u64,
    #[allow(unused_variables)] exchange: &mut dyn FnMut(
        Option<Vec<u8>>,
        Instant,
    ) -> Result<Vec<u8>, CollectiveError>,
) -> Result<(), Result<CollectiveError, WorkerError>> {
    let world = ring.world_size();
    let choice = match backend::without_vote(ctx.setting, ctx.device, world) {
        Some(c) => c,
        None => {
            let local = ctx
                .local
                .ok_or_else(|| Err(WorkerError::Internal("NCCL was not probed".into())))?;
            let votes = backend::exchange_votes(ring, Vote::of(local)).map_err(Ok)?;
            backend::decide(ctx.setting, &votes).map_err(|e| Err(WorkerError::Backend(e)))?
        }
    };
    let why = match choice {
        Choice::Ring(why) => why,
        Choice::Nccl(why) => {
            #[cfg(feature = "nccl")]
            {
                match attach(ring, ctx, exchange)? {
                    None => {
                        tracing::info!(
                            generation,
                            backend = "nccl",
                            "collective backend: nccl ({why})"
                        );
                        return Ok(());
                    }
                    Some(failed) if ctx.setting == CollectiveBackend::Nccl => {
                        return Err(Err(WorkerError::Backend(format!(
                            "cluster.collective is `nccl`, but {failed}"
                        ))));
                    }
                    Some(failed) => failed,
                }
            }
            #[cfg(not(feature = "nccl"))]
            {
                // This rank voted that it cannot use NCCL, so no decision picks it.
                return Err(Err(WorkerError::Internal(format!(
                    "NCCL chosen ({why}) by a worker built without it"
                ))));
            }
        }
    };
    let here = match ctx.local.map(|l| &l.usable) {
        Some(Err(e)) if ctx.setting == CollectiveBackend::Auto => format!("; here: {e}"),
        _ => String::new(),
    };
    tracing::info!(
        generation,
        backend = "ring",
        "collective backend: ring ({why}{here})"
    );
    Ok(())
}

/// Forms the NCCL communicator on every rank, then checks over the ring that all did;
/// `Some(what failed)` when any rank could not (the communicator is dropped everywhere).
#[cfg(feature = "nccl")]
fn attach(
    ring: &mut RingCollective,
    ctx: &BackendCtx,
    exchange: &mut dyn FnMut(Option<Vec<u8>>, Instant) -> Result<Vec<u8>, CollectiveError>,
) -> Result<Option<String>, Result<CollectiveError, WorkerError>> {
    // Half the collective timeout: a rank that failed at once then still finds the others
    // waiting in the check below (its receives wait a whole timeout).
    let limit = ctx.timeout / 2;
    let deadline = Instant::now() + limit;
    let r = ring.attach_nccl(limit, &mut |mine| exchange(mine, deadline));
    let (rank, world) = (ring.rank(), ring.world_size());
    let mut failed = vec![0.0f64; world];
    if let Err(e) = &r {
        tracing::warn!(error = %e, "forming the NCCL communicator failed here");
        failed[rank] = 1.0;
    }
    ring.all_reduce_sum_f64(&mut failed).map_err(Ok)?;
    let bad: Vec<String> = (0..world)
        .filter(|&i| failed[i] > 0.0)
        .map(|i| i.to_string())
        .collect();
    if bad.is_empty() {
        return Ok(None);
    }
    ring.detach_nccl();
    Ok(Some(format!(
        "the NCCL communicator could not be formed on rank(s) {}{}",
        bad.join(", "),
        match r {
            Err(e) => format!(" (here: {e})"),
            Ok(()) => String::new(),
        }
    )))
}

/// Publishes (rank 0: `mine`) or fetches the NCCL unique id of `generation` through the
/// coordinator, asking again until `deadline` while rank 0 has not published it.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(super) fn exchange_nccl_id(
    rt: &scfm_common::runtime::Rt,
    client: &mut Client,
    worker_id: &str,
    generation: u64,
    mine: Option<Vec<u8>>,
    deadline: Instant,
) -> Result<Vec<u8>, CollectiveError> {
    let fail = |reason: String| CollectiveError::Device {
        op: crate::collective::Op::Handshake,
        reason,
    };
    rt.block_on(async {
        loop {
            let req = super::pb::NcclIdRequest {
                worker_id: worker_id.to_string(),
                generation,
                id: mine.clone().unwrap_or_default(),
            };
            // The coordinator answers within ~10 s (the id, or "not yet": empty).
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = left.clamp(Duration::from_secs(1), Duration::from_secs(30));
            match tokio::time::timeout(wait, client.exchange_nccl_id(req)).await {
                Ok(Ok(r)) if !r.get_ref().id.is_empty() => return Ok(r.into_inner().id),
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(s)) => return Err(fail(format!("NCCL id exchange: {}", s.message()))),
            }
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "no NCCL id for generation {generation} from rank 0 in time"
                )));
            }
        }
    })
}
