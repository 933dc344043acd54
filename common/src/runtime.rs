//! The one tokio runtime of a process, and a cheap handle to it.
//!
//! A binary builds its runtime once, at the start of the command it runs ([`Rt::new`]),
//! and passes the [`Rt`] (a clone of a [`tokio::runtime::Handle`], plus ownership when it
//! built the runtime) to every part that needs async I/O: storage calls, checkpoint
//! uploads, shard downloads, the coordinator connection. Plain threads call
//! [`Rt::block_on`]; code already inside an async task awaits instead (blocking there
//! panics). Library entry points that tests call without a runtime build their own with
//! [`Rt::new`] — a binary must not.

use std::future::Future;
use std::sync::Arc;

use tokio::runtime::{Handle, Runtime};

/// The name of the runtime's threads (its workers and its blocking pool): tests count
/// them in `/proc/PID/task/*/comm` (at most 15 bytes there).
pub const THREAD_NAME: &str = "scfm-rt";

/// Worker threads of the runtime: the async work is I/O (RPCs, storage), the heavy
/// compute runs on libtorch's threads and the data loader's.
pub const WORKER_THREADS: usize = 2;

/// A runtime built here, shut down without waiting when the last [`Rt`] owning it goes
/// (so that dropping it is allowed anywhere, even inside an async task).
struct Owned(Option<Runtime>);

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A handle to the process's tokio runtime (cheap to clone); keeps the runtime alive when
/// it built it.
#[derive(Clone)]
pub struct Rt {
    handle: Handle,
    _owned: Option<Arc<Owned>>,
}

impl std::fmt::Debug for Rt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rt")
            .field("owned", &self._owned.is_some())
            .finish()
    }
}

impl Rt {
    /// Builds a multi-thread runtime of [`WORKER_THREADS`] workers named [`THREAD_NAME`],
    /// with I/O and timers, owned by the returned handle and its clones.
    pub fn new() -> std::io::Result<Rt> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name(THREAD_NAME)
            .enable_all()
            .build()?;
        Ok(Rt {
            handle: rt.handle().clone(),
            _owned: Some(Arc::new(Owned(Some(rt)))),
        })
    }

    /// A handle to a runtime that someone else owns (and keeps running).
    pub fn from_handle(handle: Handle) -> Rt {
        Rt {
            handle,
            _owned: None,
        }
    }

    /// The tokio handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `f` to completion on this thread, inside the runtime (its spawned tasks and
    /// I/O are driven by the runtime's workers). Panics inside an async task: call it from
    /// plain threads only.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    /// Spawns `f` on the runtime's workers.
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of this process whose name is `name` (Linux).
    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                    .filter(|c| c.trim_end() == name)
                    .count()
            })
            .unwrap_or(0)
    }

    #[test]
    fn a_runtime_has_few_named_threads_and_clones_share_it() {
        let rt = Rt::new().unwrap();
        let other = rt.clone();
        let n = rt.block_on(async { 40 + 2 });
        assert_eq!(n, 42);
        assert_eq!(other.block_on(other.spawn(async { 7 })).unwrap(), 7);
        // A new thread names itself once it first runs (Rust's std sets the name from
        // inside the thread), so on a loaded machine the count lags a moment: wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut named = threads_named(THREAD_NAME);
        while named < WORKER_THREADS && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            named = threads_named(THREAD_NAME);
        }
        assert!(
            named >= WORKER_THREADS,
            "{named} threads named {THREAD_NAME}"
        );
        // Dropping the last owner inside a task does not panic.
        let inner = Rt::new().unwrap();
        rt.block_on(async move { drop(inner) });
    }
}
