//! Metrics aggregation: per-step metrics streamed by workers become log lines, Prometheus
//! gauges and the run's metrics log next to the checkpoints (numbered parts, see
//! [`scfm_common::metrics_log`]).
//!
//! Memory is bounded: the sink holds only the lines received since the last flush (at
//! most [`MAX_PENDING_BYTES`]), one mark per worker and the rollbacks of this job. Each
//! flush writes the new lines as the next part, so uploads grow with new lines only.
//!
//! Nothing acknowledged is lost: a worker keeps each report until the coordinator
//! acknowledges it, and the coordinator acknowledges a worker's reports only once they are
//! in a written part. A report that arrives twice (resent after a broken stream or a
//! coordinator restart) is recognised by the worker's mark — its highest `(generation,
//! step)` handled, since each worker sends in that order — and dropped. The marks are
//! stored in the log's index, so a restarted coordinator that adopts the running workers
//! knows what its predecessor wrote.

mod progress;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use scfm_common::metrics_log::{self, PartWriter, Record, StepLine};
use scfm_common::rpc::pb;
use scfm_common::storage::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use progress::Tracker;
pub use progress::{LastStep, Progress, val_of_line};

/// Pending bytes that make the next flush come at once rather than at its tick.
pub const FLUSH_BYTES: usize = 4 << 20;
/// Pending bytes beyond which reports are refused (the store is failing): the workers
/// keep them and send them again later.
pub const MAX_PENDING_BYTES: usize = 64 << 20;
/// Bytes of the log's end read at start (the latest step and validation loss).
const PRELOAD_TAIL: u64 = 1 << 20;

/// What became of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Added to the log (or dropped as a step that a later generation undid).
    Recorded,
    /// Already handled (a resend): dropped.
    Duplicate,
    /// Refused: too much is waiting to be written. The worker keeps it.
    Full,
}

/// The coordinator's state in the log's index.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct WriterState {
    /// Highest generation seen in a step report.
    generation: u64,
    /// `(generation, step)`: generation `g` continued from step `s`.
    rollbacks: Vec<(u64, u64)>,
    /// Per worker, the highest `(generation, step)` handled.
    marks: BTreeMap<String, (u64, u64)>,
}

/// Lines waiting to be written, and what the sink knows of what it wrote.
#[derive(Default)]
struct Lines {
    pending: Vec<String>,
    pending_bytes: usize,
    /// Per worker, the highest `(generation, step)` handled (pending, written or dropped).
    received: HashMap<String, (u64, u64)>,
    /// Per worker, the highest `(generation, step)` written (or dropped): acknowledged.
    durable: HashMap<String, (u64, u64)>,
    /// `(generation, step)`: generation `g` continued from step `s`, so the steps after
    /// `s` reported by earlier generations were undone.
    rollbacks: Vec<(u64, u64)>,
    /// Highest generation seen in a step report.
    generation: u64,
    /// Highest step of any line in the log, written or pending.
    max_step: u64,
    /// Generations formed after a membership change: `(generation, when the change was
    /// noticed)`, until their first step arrives.
    formed: Vec<(u64, Instant)>,
}

impl Lines {
    /// Whether a step of `generation` was undone by a later generation.
    fn undone(&self, generation: u64, step: u64) -> bool {
        self.rollbacks
            .iter()
            .any(|&(g, s)| generation < g && step > s)
    }

    fn push(&mut self, r: &Record) {
        if let Some(s) = r.step() {
            self.max_step = self.max_step.max(s);
        }
        let line = r.to_line();
        self.pending_bytes += line.len() + 1;
        self.pending.push(line);
    }

    fn state(&self) -> WriterState {
        WriterState {
            generation: self.generation,
            rollbacks: self.rollbacks.clone(),
            marks: self.received.iter().map(|(w, &m)| (w.clone(), m)).collect(),
        }
    }
}

/// How the sink starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// The job runs on from step `n` (a checkpoint, or 0): lines of later steps that an
    /// earlier launch wrote no longer count.
    From(u64),
    /// A restarted coordinator adopts the running workers: everything written counts, and
    /// the workers' marks carry over.
    Adopt,
}

/// The line of a worker's step report.
fn step_line(m: &pb::StepMetrics) -> Record {
    Record::Step(StepLine {
        worker: Some(m.worker_id.clone()),
        generation: m.generation,
        step: m.step,
        epoch: m.epoch,
        loss: m.loss,
        mgem: m.mgem,
        contrastive: m.contrastive,
        gepc: m.gepc,
        grad_norm: m.grad_norm,
        lr: m.lr,
        cells_per_s: m.cells_per_s,
        data_wait_s: m.data_wait_s,
        compute_s: m.step_s - m.data_wait_s,
        allreduce_s: m.allreduce_s,
        allreduce_wait_s: m.allreduce_wait_s,
        step_s: m.step_s,
        val_loss: Some(m.val_loss).filter(|v| !v.is_nan()),
        offset: m.offset,
        step_cells: m.step_cells,
        rank: m.rank,
        world_size: m.world_size,
        total_steps: m.total_steps,
    })
}

/// Collects step metrics from every worker. Steps that a later generation rolled back
/// (a survivor completed them in a generation that lost a worker) are dropped when they
/// arrive late, and a `rollback` line discounts those already logged, so the log's
/// counting lines hold the steps that count: with `offset` (the step's place in the data
/// stream, `epoch * n_train + position`), `step_cells` and `rank`/`world_size` per worker
/// line they account for every cell consumed.
pub struct MetricsSink {
    lines: Mutex<Lines>,
    progress: Mutex<Tracker>,
    last_step: AtomicU64,
    log_every: u64,
    /// Pending bytes beyond which reports are refused ([`MAX_PENDING_BYTES`]).
    max_pending: usize,
    writer: tokio::sync::Mutex<PartWriter>,
    /// Bumped after every flush that wrote (acknowledgements follow).
    flushed: watch::Sender<u64>,
    /// Asks for a flush before the next tick (a stream ended, the backlog grew).
    flush_soon: Notify,
}

impl MetricsSink {
    /// Continues the metrics log in `store`; logs every `log_every` steps. A job that runs
    /// on from a step below what the log holds gets a `rollback` line first.
    pub async fn open(store: Store, log_every: u64, start: Start) -> scfm_common::Result<Self> {
        let (writer, recovered) = PartWriter::open(store.clone()).await?;
        let mut lines = Lines {
            max_step: writer.max_step(),
            ..Lines::default()
        };
        let upto = match start {
            Start::Adopt => {
                let mut st: WriterState = recovered
                    .writer
                    .and_then(|v| serde_json::from_value(v).ok())
                    .unwrap_or_default();
                let later: Vec<serde_json::Value> = recovered
                    .unindexed
                    .iter()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                for (w, m) in metrics_log::worker_marks(&later) {
                    let e = st.marks.entry(w).or_insert(m);
                    *e = (*e).max(m);
                    st.generation = st.generation.max(m.0);
                }
                for v in &later {
                    if let Some(to) = metrics_log::rollback_to(v)
                        && let Some(g) = v["generation"].as_u64().filter(|&g| g > 0)
                    {
                        st.rollbacks.push((g, to));
                    }
                }
                lines.generation = st.generation;
                lines.rollbacks = st.rollbacks;
                lines.received = st.marks.into_iter().collect();
                lines.durable = lines.received.clone();
                u64::MAX
            }
            Start::From(step) => {
                if lines.max_step > step {
                    lines.push(&Record::Rollback {
                        to_step: step,
                        generation: 0,
                        reason: "resume".into(),
                    });
                    lines.max_step = step;
                }
                step
            }
        };
        let mut tracker = Tracker::default();
        if let Some(tail) = metrics_log::read_tail(&store, PRELOAD_TAIL).await? {
            tracker.preload(&tail, upto);
        }
        let last = tracker.last.as_ref().map_or(0, |l| l.step);
        Ok(MetricsSink {
            lines: Mutex::new(lines),
            progress: Mutex::new(tracker),
            last_step: AtomicU64::new(last),
            log_every: log_every.max(1),
            max_pending: MAX_PENDING_BYTES,
            writer: tokio::sync::Mutex::new(writer),
            flushed: watch::channel(0).0,
            flush_soon: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one worker's metrics for one step. Losses are already global (all-reduced
    /// by the workers), so the first report of a step stands for the cluster; every
    /// worker's throughput and timings are kept in the log.
    pub fn record(&self, m: &pb::StepMetrics) -> Taken {
        let key = (m.generation, m.step);
        {
            let mut l = self.lock();
            if l.received.get(&m.worker_id).is_some_and(|&r| key <= r) {
                return Taken::Duplicate;
            }
            if l.pending_bytes >= self.max_pending {
                return Taken::Full;
            }
            if m.generation > l.generation {
                // The first step of a new generation: it continued from the step before,
                // so later steps of earlier generations did not count.
                let from = m.step.saturating_sub(1);
                let g = m.generation;
                if from < l.max_step {
                    tracing::warn!(
                        generation = g,
                        from_step = from,
                        "steps of the previous generation rolled back"
                    );
                    l.push(&Record::Rollback {
                        to_step: from,
                        generation: g,
                        reason: "generation".into(),
                    });
                    l.max_step = from;
                }
                l.rollbacks.push((g, from));
                l.generation = g;
                if let Some(i) = l.formed.iter().position(|&(fg, _)| fg == g) {
                    let (_, since) = l.formed.swap_remove(i);
                    let secs = since.elapsed().as_secs_f64();
                    tracing::info!(
                        generation = g,
                        step = m.step,
                        seconds = secs,
                        "first step of the new generation, {secs:.2} s after the membership change was noticed"
                    );
                    l.push(&Record::Recovered {
                        generation: g,
                        first_step: m.step,
                        seconds: secs,
                    });
                }
            }
            l.received.insert(m.worker_id.clone(), key);
            if l.undone(m.generation, m.step) {
                return Taken::Recorded;
            }
            self.progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(m);
            l.push(&step_line(m));
            if l.pending_bytes >= FLUSH_BYTES {
                self.flush_soon.notify_one();
            }
        }
        self.gauges(m);
        Taken::Recorded
    }

    /// Prometheus gauges and the training log line of a recorded report.
    fn gauges(&self, m: &pb::StepMetrics) {
        let first = self.last_step.fetch_max(m.step, Ordering::SeqCst) < m.step;
        metrics::gauge!("scfm_worker_cells_per_second", "worker" => m.worker_id.clone())
            .set(m.cells_per_s);
        metrics::gauge!("scfm_worker_data_wait_seconds", "worker" => m.worker_id.clone())
            .set(m.data_wait_s);
        metrics::gauge!("scfm_worker_allreduce_seconds", "worker" => m.worker_id.clone())
            .set(m.allreduce_s);
        metrics::gauge!("scfm_worker_allreduce_wait_seconds", "worker" => m.worker_id.clone())
            .set(m.allreduce_wait_s);
        if first {
            metrics::gauge!("scfm_step").set(m.step as f64);
            metrics::gauge!("scfm_loss").set(m.loss);
            metrics::gauge!("scfm_mgem_loss").set(m.mgem);
            metrics::gauge!("scfm_contrastive_loss").set(m.contrastive);
            metrics::gauge!("scfm_gepc_loss").set(m.gepc);
            metrics::gauge!("scfm_grad_norm").set(m.grad_norm);
            metrics::gauge!("scfm_learning_rate").set(m.lr);
            if m.step.is_multiple_of(self.log_every) {
                tracing::info!(
                    step = m.step,
                    epoch = m.epoch,
                    loss = m.loss,
                    mgem = m.mgem,
                    contrastive = m.contrastive,
                    grad_norm = m.grad_norm,
                    lr = m.lr,
                    cells_per_s = m.cells_per_s as u64,
                    allreduce_s = m.allreduce_s,
                    "train"
                );
            }
        }
        if !m.val_loss.is_nan() {
            metrics::gauge!("scfm_val_loss").set(m.val_loss);
            tracing::info!(step = m.step, val_loss = m.val_loss, worker = %m.worker_id, "eval");
        }
    }

    /// Records an event line (a new generation, ...).
    pub fn event(&self, r: &Record) {
        self.lock().push(r);
    }

    /// Notes that generation `g` formed after a membership change noticed at `since` (its
    /// first step is logged with the time it took).
    pub fn generation_formed(&self, g: u64, since: Instant) {
        self.lock().formed.push((g, since));
    }

    /// The latest step, validation loss and step rate.
    pub fn progress(&self) -> Progress {
        let t = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        Progress {
            last: t.last.clone(),
            val: t.val,
            steps_per_s: t.steps_per_s(),
        }
    }

    /// Highest step reported so far.
    pub fn last_step(&self) -> u64 {
        self.last_step.load(Ordering::SeqCst)
    }

    /// Lines and bytes waiting to be written.
    pub fn pending(&self) -> (usize, usize) {
        let l = self.lock();
        (l.pending.len(), l.pending_bytes)
    }

    /// What is acknowledged of `worker`'s reports: its highest `(generation, step)` written.
    pub fn durable_mark(&self, worker: &str) -> Option<(u64, u64)> {
        self.lock().durable.get(worker).copied()
    }

    /// `worker`'s highest `(generation, step)` handled, written or not.
    pub fn received_mark(&self, worker: &str) -> Option<(u64, u64)> {
        self.lock().received.get(worker).copied()
    }

    /// Changes after every flush (to send acknowledgements).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.flushed.subscribe()
    }

    /// Asks for a flush before the next tick.
    pub fn request_flush(&self) {
        self.flush_soon.notify_one();
    }

    /// Waits until a flush is asked for.
    pub async fn flush_requested(&self) {
        self.flush_soon.notified().await;
    }

    /// Writes the lines received since the last flush as the next part of the log, then
    /// acknowledges them. On failure they stay pending (and unacknowledged).
    pub async fn flush(&self) -> scfm_common::Result<()> {
        let mut w = self.writer.lock().await;
        let (lines, state) = {
            let mut l = self.lock();
            l.pending_bytes = 0;
            (std::mem::take(&mut l.pending), l.state())
        };
        let n = lines.len();
        let value = serde_json::to_value(&state).expect("the writer state serializes");
        match w.write(&lines, value).await {
            Ok(()) => {
                let changed = {
                    let mut l = self.lock();
                    let marks: HashMap<String, (u64, u64)> = state.marks.into_iter().collect();
                    let changed = marks != l.durable;
                    l.durable = marks;
                    changed
                };
                if n > 0 || changed {
                    self.flushed.send_modify(|v| *v += 1);
                }
                Ok(())
            }
            Err(e) => {
                let mut l = self.lock();
                let newer = std::mem::replace(&mut l.pending, lines);
                l.pending.extend(newer);
                l.pending_bytes = l.pending.iter().map(|x| x.len() + 1).sum();
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests;
