//! The heartbeat task of a cluster worker: tells the coordinator it is alive (with its
//! generation and step) and turns the coordinator's orders into requests on the worker's
//! [`Control`]. It never ends the process: on a Stop order, or when the coordinator no
//! longer knows this worker, it records the end in the control, breaks the ring of the
//! current generation (so a collective blocked in it returns) and stops beating; the
//! training loop leaves through its normal path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use scfm_common::rpc::{PROTOCOL_VERSION, pb};
use scfm_common::runtime::Rt;
use tonic::Code;

use super::{AbortSlot, Client};
use crate::control::Control;

/// What the heartbeat task reads and acts on.
pub(super) struct Beat {
    /// The client to the coordinator.
    pub client: Client,
    /// This worker's id.
    pub id: String,
    /// The interval of heartbeats.
    pub every: Duration,
    /// The last step this worker completed.
    pub step: Arc<AtomicU64>,
    /// The generation this worker is in (0: none yet).
    pub generation: Arc<AtomicU64>,
    /// The ring of the current generation.
    pub abort: AbortSlot,
    /// Where the orders go.
    pub control: Control,
}

/// Breaks the ring in `abort` when it belongs to `generation` (any generation: `None`),
/// so that collectives blocked in it fail at once; returns whether there was one.
pub(super) fn break_ring(abort: &AbortSlot, generation: Option<u64>) -> bool {
    let mut slot = abort.lock().unwrap_or_else(|p| p.into_inner());
    if slot
        .as_ref()
        .is_some_and(|(g, _)| generation.is_none_or(|want| *g == want))
        && let Some((_, h)) = slot.take()
    {
        h.abort();
        return true;
    }
    false
}

/// Spawns the heartbeat task on `rt`; it ends when the job ended for this worker (see the
/// module documentation) or when aborted.
pub(super) fn spawn(rt: &Rt, b: Beat) -> tokio::task::JoinHandle<()> {
    let Beat {
        mut client,
        id,
        every,
        step,
        generation,
        abort,
        control,
    } = b;
    rt.spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let req_generation = generation.load(Ordering::Relaxed);
            let req = pb::HeartbeatRequest {
                protocol_version: PROTOCOL_VERSION,
                worker_id: id.clone(),
                generation: req_generation,
                step: step.load(Ordering::Relaxed),
            };
            match tokio::time::timeout(every * 5, client.heartbeat(req)).await {
                Ok(Ok(r)) if r.get_ref().order == pb::Order::Stop as i32 => {
                    tracing::error!("the coordinator ended the job; stopping");
                    control.end("the coordinator ended the job");
                    break_ring(&abort, None);
                    return;
                }
                Ok(Ok(r)) if r.get_ref().order == pb::Order::Reform as i32 => {
                    control.request_reform(req_generation);
                }
                Ok(Ok(r)) if r.get_ref().order == pb::Order::Abort as i32 => {
                    // A member is gone: collectives of this generation cannot complete,
                    // so break the ring now rather than wait for their deadline.
                    control.request_reform(req_generation);
                    if break_ring(&abort, Some(req_generation)) {
                        tracing::warn!(
                            generation = req_generation,
                            "a member was lost: abandoning the generation"
                        );
                    }
                }
                Ok(Err(s)) if s.code() == Code::NotFound => {
                    tracing::error!(error = %s.message(), "the coordinator dropped this worker; stopping");
                    control.end(format!(
                        "the coordinator dropped this worker: {}",
                        s.message()
                    ));
                    break_ring(&abort, None);
                    return;
                }
                Ok(Ok(r)) if r.get_ref().order == pb::Order::Preempt as i32 => {
                    if !control.stop_requested() {
                        tracing::warn!("the coordinator asks to checkpoint and stop (preemption)");
                    }
                    control.request_stop();
                }
                Ok(Ok(_)) => {}
                Ok(Err(s)) => tracing::warn!(error = %s.message(), "heartbeat refused"),
                Err(_) => tracing::warn!("heartbeat timed out"),
            }
        }
    })
}
