//! Preemption: SIGTERM/SIGINT (or the coordinator's order) asks the worker to stop at the
//! next step boundary after a checkpoint. The request is agreed on by all workers inside
//! the step's first all-reduce, so every worker stops after the same step.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

fn flag() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Makes SIGTERM and SIGINT request a stop instead of killing the process.
pub fn install_signal_handlers() -> std::io::Result<()> {
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, flag().clone())?;
    }
    Ok(())
}

/// Whether a stop was requested (signal or coordinator).
pub fn requested() -> bool {
    flag().load(Ordering::SeqCst)
}

/// Requests a stop at the next step boundary.
pub fn request() {
    flag().store(true, Ordering::SeqCst);
}

/// The generation a coordinator's re-form order applies to (0: none).
fn reform_flag() -> &'static std::sync::atomic::AtomicU64 {
    static REFORM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    &REFORM
}

/// The coordinator asks the members of `generation` to stop after the current step and
/// fetch the next generation (a worker joins). Agreed on like a preemption.
pub fn request_reform(generation: u64) {
    reform_flag().fetch_max(generation, Ordering::SeqCst);
}

/// Whether the members of `generation` were asked to re-form.
pub fn reform_requested(generation: u64) -> bool {
    generation != 0 && reform_flag().load(Ordering::SeqCst) == generation
}
