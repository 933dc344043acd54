//! A running job on a [`Net`]: the coordinator in one host, workers in others, the
//! coordinator's log lines at hand (every wait with a deadline), and the workers' logs in
//! files.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use super::procs::fingerprint;
use super::{Net, Proc};

/// A job's coordinator and workers on a net.
pub struct Job<'n> {
    net: &'n Net,
    dir: PathBuf,
    /// The checkpoint directory (metrics log under `metrics/`).
    pub ckpt: PathBuf,
    /// The coordinator.
    pub coord: Proc,
    /// Its address (`host:port`).
    pub addr: String,
    log: Receiver<String>,
    /// The coordinator's log lines read so far.
    pub seen: Vec<String>,
    /// The workers, in the order they were started, with the host each runs in.
    pub workers: Vec<(usize, Proc)>,
}

impl<'n> Job<'n> {
    /// Starts the coordinator of `manifest` (checkpoints at `ckpt`) in host `coordinator`
    /// and a worker in each host of `workers`; logs go to `dir`.
    pub fn start(
        net: &'n Net,
        dir: &Path,
        (ckpt, manifest): (PathBuf, PathBuf),
        coordinator: usize,
        workers: &[usize],
    ) -> Job<'n> {
        let (coord, addr, log) = net.launch_coordinator(coordinator, &manifest);
        let mut job = Job {
            net,
            dir: dir.to_path_buf(),
            ckpt,
            coord,
            addr,
            log,
            seen: Vec::new(),
            workers: Vec::new(),
        };
        for &h in workers {
            job.add_worker(h);
        }
        job
    }

    /// Starts one more worker, in host `host`; returns its index in [`Job::workers`].
    pub fn add_worker(&mut self, host: usize) -> usize {
        let n = self.workers.len();
        let log = self.dir.join(format!("worker{n}-h{host}.log"));
        let w = self.net.join_worker(host, &self.addr, &log);
        self.workers.push((host, w));
        n
    }

    /// Waits up to `timeout` for a coordinator line containing `needle`; returns it.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        crate::wait_log(&self.log, &mut self.seen, needle, timeout);
        self.seen.last().cloned().unwrap_or_default()
    }

    /// Whether a coordinator line read so far contains `needle`.
    pub fn logged(&mut self, needle: &str) -> bool {
        self.seen.extend(self.log.try_iter());
        self.seen.iter().any(|l| l.contains(needle))
    }

    /// Waits up to `timeout` for the coordinator to exit; returns its status and all its
    /// log lines, joined.
    pub fn finish(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let status = self.coord.wait(timeout);
        // The reader thread ends with the pipe; what it has is all there is.
        while let Ok(l) = self.log.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        (status, self.seen.join("\n"))
    }

    /// Every worker's log, headed by its index and host (for failure messages).
    pub fn worker_logs(&self) -> String {
        self.workers
            .iter()
            .enumerate()
            .map(|(i, (h, w))| format!("--- worker {i} (host {h}) ---\n{}", w.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for worker `i` to exit; returns its status.
    pub fn wait_worker(&mut self, i: usize, timeout: Duration) -> ExitStatus {
        self.workers[i].1.wait(timeout)
    }

    /// The parameter fingerprints of workers `which`, asserting each logged one.
    pub fn fingerprints(&self, which: &[usize]) -> Vec<String> {
        which
            .iter()
            .map(|&i| {
                fingerprint(&self.workers[i].1.log_text()).unwrap_or_else(|| {
                    panic!("worker {i} logged no fingerprint:\n{}", self.worker_logs())
                })
            })
            .collect()
    }

    /// The counting lines of the job's metrics log.
    pub fn metrics(&self) -> Vec<serde_json::Value> {
        crate::metric_steps(&self.ckpt)
    }
}
