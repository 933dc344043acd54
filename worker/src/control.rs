//! What asks a worker to stop, passed explicitly to the parts that act on it (the
//! trainer, the step, the cluster loop, the distributed embedding).
//!
//! - A *stop* (SIGTERM/SIGINT, or the coordinator's preemption order): checkpoint at the
//!   next step boundary and stop. Agreed on by all workers inside the step's first
//!   all-reduce, so every worker stops after the same step.
//! - A *re-form* of a generation (a worker joins, or a member was lost): leave for the
//!   next generation after the current step, agreed on like a stop.
//! - An *end* (the coordinator ended the job, or dropped this worker): nothing more to
//!   train; the worker leaves at the next step boundary, or when the collective it is
//!   blocked in fails (the heartbeat breaks the ring), and exits with code 3 through its
//!   normal shutdown ([`crate::WorkerError::Ended`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Inner {
    /// Shared with the signal handlers.
    stop: Arc<AtomicBool>,
    /// The newest generation asked to re-form (0: none).
    reform: AtomicU64,
    /// Why the job ended for this worker.
    end: Mutex<Option<String>>,
}

/// A worker's stop, re-form and end requests (cheap to clone; clones share them).
#[derive(Clone, Default)]
pub struct Control(Arc<Inner>);

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("stop", &self.stop_requested())
            .field("reform", &self.0.reform.load(Ordering::SeqCst))
            .field("end", &self.ended())
            .finish()
    }
}

impl Control {
    /// No request yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes SIGTERM and SIGINT request a stop (instead of killing the process).
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, self.0.stop.clone())?;
        }
        Ok(())
    }

    /// Requests a stop at the next step boundary (after a checkpoint).
    pub fn request_stop(&self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested (signal or coordinator).
    pub fn stop_requested(&self) -> bool {
        self.0.stop.load(Ordering::SeqCst)
    }

    /// The coordinator asks the members of `generation` to stop after the current step
    /// and fetch the next generation.
    pub fn request_reform(&self, generation: u64) {
        self.0.reform.fetch_max(generation, Ordering::SeqCst);
    }

    /// Whether the members of `generation` were asked to re-form.
    pub fn reform_requested(&self, generation: u64) -> bool {
        generation != 0 && self.0.reform.load(Ordering::SeqCst) == generation
    }

    /// Records that the job is over for this worker, and why (the first reason stays).
    pub fn end(&self, reason: impl Into<String>) {
        let mut e = self.0.end.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(reason.into());
        }
    }

    /// Why the job ended for this worker, once it did.
    pub fn ended(&self) -> Option<String> {
        self.0.end.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `Err(Ended)` once the job ended for this worker.
    pub fn check(&self) -> crate::Result<()> {
        match self.ended() {
            Some(reason) => Err(crate::WorkerError::Ended(reason)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two controls in one process are independent (the old flags were process-wide), and
    /// clones share their requests.
    #[test]
    fn controls_are_independent_and_clones_share() {
        let (a, b) = (Control::new(), Control::new());
        let a2 = a.clone();
        a.request_stop();
        a.request_reform(4);
        a.end("the coordinator ended the job");
        assert!(a2.stop_requested() && a2.reform_requested(4) && !a2.reform_requested(3));
        assert_eq!(a2.ended().as_deref(), Some("the coordinator ended the job"));
        assert!(matches!(a2.check(), Err(crate::WorkerError::Ended(_))));
        assert!(!b.stop_requested() && !b.reform_requested(4) && b.ended().is_none());
        assert!(b.check().is_ok());
        // The first reason stays; re-form generations only grow.
        a.end("later");
        a.request_reform(2);
        assert_eq!(a.ended().as_deref(), Some("the coordinator ended the job"));
        assert!(a.reform_requested(4));
    }
}
