//! Metrics aggregation: per-step metrics streamed by workers become log lines,
//! Prometheus gauges and `metrics.jsonl` next to the checkpoints.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use scfm_common::rpc::pb;
use scfm_common::storage::Store;

/// One line of `metrics.jsonl`.
struct Line {
    /// Generation that produced it (0: not from a worker's step).
    generation: u64,
    /// Step it belongs to, if any.
    step: Option<u64>,
    text: String,
}

/// The lines, and the rollbacks that new generations made.
#[derive(Default)]
struct Lines {
    lines: Vec<Line>,
    /// `(generation, step)`: generation `g` continued from step `s`, so the steps after
    /// `s` reported by earlier generations were undone.
    rollbacks: Vec<(u64, u64)>,
    /// Highest generation seen in a step report.
    generation: u64,
    /// Generations formed after a membership change: `(generation, when the change was
    /// noticed)`, until their first step arrives.
    formed: Vec<(u64, std::time::Instant)>,
}

impl Lines {
    /// Whether a step of `generation` was undone by a later generation.
    fn undone(&self, generation: u64, step: u64) -> bool {
        self.rollbacks
            .iter()
            .any(|&(g, s)| generation < g && step > s)
    }
}

/// The cluster's latest step as its first report told it (losses are global), read back
/// from a `metrics.jsonl` line too.
#[derive(Debug, Clone, PartialEq)]
pub struct LastStep {
    /// Optimizer step.
    pub step: u64,
    /// Epoch of the step.
    pub epoch: u64,
    /// Generation that ran it (0: unknown, e.g. a single-process run).
    pub generation: u64,
    /// World size of the step (0: unknown).
    pub world_size: u64,
    /// Total loss.
    pub loss: f64,
    /// MGEM loss.
    pub mgem: f64,
    /// NT-Xent (contrastive) loss.
    pub contrastive: f64,
    /// Cells per second (all workers together) of the step.
    pub cells_per_s: f64,
    /// Steps of the whole run as the workers planned them at this step (`None`: unknown).
    pub total_steps: Option<u64>,
}

impl LastStep {
    /// A `metrics.jsonl` step line (`"event": "step"`), or `None` for other lines.
    pub fn from_line(v: &serde_json::Value) -> Option<LastStep> {
        if v["event"] != "step" {
            return None;
        }
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        Some(LastStep {
            step: v["step"].as_u64()?,
            epoch: u("epoch"),
            generation: u("generation"),
            world_size: u("world_size"),
            loss: f("loss"),
            mgem: f("mgem"),
            contrastive: f("contrastive"),
            cells_per_s: f("cells_per_s"),
            total_steps: v["total_steps"].as_u64().filter(|&t| t > 0),
        })
    }

    fn of(m: &pb::StepMetrics) -> LastStep {
        LastStep {
            step: m.step,
            epoch: m.epoch,
            generation: m.generation,
            world_size: u64::from(m.world_size),
            loss: m.loss,
            mgem: m.mgem,
            contrastive: m.contrastive,
            cells_per_s: m.cells_per_s,
            total_steps: Some(m.total_steps).filter(|&t| t > 0),
        }
    }
}

/// A validation loss found in a `metrics.jsonl` line (a step line with `val_loss`, or an
/// `eval` event): `(step, val_loss)`.
pub fn val_of_line(v: &serde_json::Value) -> Option<(u64, f64)> {
    if v["event"] != "step" && v["event"] != "eval" {
        return None;
    }
    Some((v["step"].as_u64()?, v["val_loss"].as_f64()?))
}

/// What the sink knows of the run's progress (for `scfm status`).
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The latest step.
    pub last: Option<LastStep>,
    /// The latest validation loss: `(step, loss)`.
    pub val: Option<(u64, f64)>,
    /// Steps per second over the recent steps (wall clock, evaluations and checkpoints
    /// included), when at least two steps were seen in this generation.
    pub steps_per_s: Option<f64>,
}

/// Steps kept for the rate estimate.
const RATE_WINDOW: usize = 50;

/// Collects step metrics from every worker. Steps that a later generation rolled back
/// (a survivor completed them in a generation that lost a worker) are dropped, so the
/// file holds the steps that count: with `offset` (the step's place in the data stream,
/// `epoch * n_train + position`), `step_cells` and `rank`/`world_size` per worker line it
/// accounts for every cell consumed.
pub struct MetricsSink {
    lines: Mutex<Lines>,
    progress: Mutex<Tracker>,
    last_step: AtomicU64,
    log_every: u64,
    store: Store,
}

/// The latest step, validation loss and arrival times of recent steps.
#[derive(Default)]
struct Tracker {
    last: Option<LastStep>,
    val: Option<(u64, f64)>,
    /// `(when its first report arrived, step)`, oldest first, of the current generation.
    times: std::collections::VecDeque<(std::time::Instant, u64)>,
}

impl Tracker {
    fn record(&mut self, m: &pb::StepMetrics) {
        if !m.val_loss.is_nan() && self.val.is_none_or(|(s, _)| m.step >= s) {
            self.val = Some((m.step, m.val_loss));
        }
        let newer = match &self.last {
            None => true,
            Some(l) => {
                m.generation > l.generation || (m.generation == l.generation && m.step > l.step)
            }
        };
        if !newer {
            return;
        }
        if self
            .last
            .as_ref()
            .is_some_and(|l| m.generation != l.generation)
        {
            self.times.clear();
        }
        self.last = Some(LastStep::of(m));
        self.times.push_back((std::time::Instant::now(), m.step));
        if self.times.len() > RATE_WINDOW {
            self.times.pop_front();
        }
    }

    fn steps_per_s(&self) -> Option<f64> {
        let (&(t0, s0), &(t1, s1)) = (self.times.front()?, self.times.back()?);
        let dt = t1.duration_since(t0).as_secs_f64();
        (s1 > s0 && dt > 0.0).then(|| (s1 - s0) as f64 / dt)
    }
}

impl MetricsSink {
    /// Writes `metrics.jsonl` into `store`; logs every `log_every` steps.
    pub fn new(store: Store, log_every: u64) -> Self {
        MetricsSink {
            lines: Mutex::new(Lines::default()),
            progress: Mutex::new(Tracker::default()),
            last_step: AtomicU64::new(0),
            log_every: log_every.max(1),
            store,
        }
    }

    /// Keeps the lines of an earlier `metrics.jsonl` whose step is at most `upto` (the run
    /// continues from there), so the file keeps the whole run's history.
    pub fn preload(&self, text: &str, upto: u64) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        for l in text.lines() {
            let v = serde_json::from_str::<serde_json::Value>(l).unwrap_or_default();
            let step = v["step"].as_u64();
            if let Some(s) = step.filter(|&s| s <= upto) {
                if let Some(last) = LastStep::from_line(&v) {
                    // Generation 0: any step of this coordinator's generations is newer.
                    progress.last = Some(LastStep {
                        generation: 0,
                        ..last
                    });
                }
                if let Some(val) = val_of_line(&v) {
                    progress.val = Some(val);
                }
                lines.lines.push(Line {
                    generation: 0,
                    step: Some(s),
                    text: l.to_string(),
                });
                self.last_step.fetch_max(s, Ordering::SeqCst);
            }
        }
    }

    /// Records one worker's metrics for one step. Losses are already global (all-reduced
    /// by the workers), so the first report of a step stands for the cluster; every
    /// worker's throughput and timings are kept in the file.
    pub fn record(&self, m: &pb::StepMetrics) {
        let line = serde_json::json!({
            "event": "step", "worker": m.worker_id, "generation": m.generation, "step": m.step, "epoch": m.epoch,
            "loss": m.loss, "mgem": m.mgem, "contrastive": m.contrastive, "gepc": m.gepc, "grad_norm": m.grad_norm, "lr": m.lr,
            "cells_per_s": m.cells_per_s, "data_wait_s": m.data_wait_s, "allreduce_s": m.allreduce_s, "step_s": m.step_s,
            "val_loss": if m.val_loss.is_nan() { serde_json::Value::Null } else { m.val_loss.into() },
            "offset": m.offset, "step_cells": m.step_cells, "rank": m.rank, "world_size": m.world_size,
            "total_steps": m.total_steps,
        });
        {
            let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            if m.generation > l.generation {
                // The first step of a new generation: it continued from the step before,
                // so later steps of earlier generations did not count.
                let from = m.step.saturating_sub(1);
                let g = m.generation;
                let before = l.lines.len();
                l.lines
                    .retain(|x| !(x.generation != 0 && x.generation < g && x.step > Some(from)));
                if l.lines.len() < before {
                    tracing::warn!(
                        generation = g,
                        from_step = from,
                        lines = before - l.lines.len(),
                        "steps of the previous generation rolled back"
                    );
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
                    l.lines.push(Line {
                        generation: 0,
                        step: None,
                        text: serde_json::json!({"event": "recovered", "generation": g, "first_step": m.step, "seconds": secs}).to_string(),
                    });
                }
            }
            if l.undone(m.generation, m.step) {
                return;
            }
            self.progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(m);
            l.lines.push(Line {
                generation: m.generation,
                step: Some(m.step),
                text: line.to_string(),
            });
        }
        let first = self.last_step.fetch_max(m.step, Ordering::SeqCst) < m.step;
        metrics::gauge!("scfm_worker_cells_per_second", "worker" => m.worker_id.clone())
            .set(m.cells_per_s);
        metrics::gauge!("scfm_worker_data_wait_seconds", "worker" => m.worker_id.clone())
            .set(m.data_wait_s);
        metrics::gauge!("scfm_worker_allreduce_seconds", "worker" => m.worker_id.clone())
            .set(m.allreduce_s);
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
    pub fn event(&self, v: serde_json::Value) {
        let step = v["step"].as_u64();
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .push(Line {
                generation: 0,
                step,
                text: v.to_string(),
            });
    }

    /// Notes that generation `g` formed after a membership change noticed at `since` (its
    /// first step is logged with the time it took).
    pub fn generation_formed(&self, g: u64, since: std::time::Instant) {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .formed
            .push((g, since));
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

    /// Writes all lines to `metrics.jsonl` in the checkpoint store.
    pub async fn flush(&self) -> scfm_common::Result<()> {
        let text = {
            let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            if lines.lines.is_empty() {
                return Ok(());
            }
            let mut t = lines
                .lines
                .iter()
                .map(|l| l.text.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            t.push('\n');
            t
        };
        self.store.put("metrics.jsonl", Bytes::from(text)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(worker: &str, generation: u64, step: u64) -> pb::StepMetrics {
        pb::StepMetrics {
            worker_id: worker.into(),
            generation,
            step,
            val_loss: f64::NAN,
            ..Default::default()
        }
    }

    fn steps(sink: &MetricsSink) -> Vec<(u64, u64)> {
        let l = sink.lines.lock().unwrap();
        l.lines
            .iter()
            .filter(|x| x.generation > 0)
            .map(|x| (x.generation, x.step.unwrap()))
            .collect()
    }

    /// `scfm status` sees the latest step (a new generation's step replaces a rolled-back
    /// one), the latest validation loss, the step rate, and what a preloaded file held.
    #[test]
    fn progress_follows_the_latest_step_and_validation() {
        let store = Store::open(tempfile::tempdir().unwrap().path().to_str().unwrap()).unwrap();
        let sink = MetricsSink::new(store.clone(), 1000);
        assert!(sink.progress().last.is_none());
        for s in 1..=3 {
            let mut x = m("a", 1, s);
            (x.loss, x.total_steps, x.world_size) = (5.0 - s as f64, 10, 2);
            if s == 2 {
                x.val_loss = 4.5;
            }
            sink.record(&x);
            sink.record(&pb::StepMetrics {
                worker_id: "b".into(),
                val_loss: f64::NAN,
                ..x
            });
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let p = sink.progress();
        let last = p.last.unwrap();
        assert_eq!((last.step, last.loss, last.total_steps), (3, 2.0, Some(10)));
        assert_eq!(p.val, Some((2, 4.5)));
        assert!(p.steps_per_s.is_some_and(|r| r > 0.0));
        // Generation 2 continues from step 2: its step 3 is the latest; the rate restarts.
        sink.record(&m("a", 2, 3));
        let p = sink.progress();
        assert_eq!(
            p.last.as_ref().map(|l| (l.generation, l.step)),
            Some((2, 3))
        );
        assert!(p.steps_per_s.is_none());
        // A coordinator resuming at step 2 from the file knows step 2's losses.
        let text: String = sink
            .lines
            .lock()
            .unwrap()
            .lines
            .iter()
            .map(|l| format!("{}\n", l.text))
            .collect();
        let again = MetricsSink::new(store, 1000);
        again.preload(&text, 2);
        let p = again.progress();
        let last = p.last.unwrap();
        assert_eq!((last.generation, last.step, last.loss), (0, 2, 3.0));
        assert_eq!(p.val, Some((2, 4.5)));
    }

    /// A survivor finished step 4 of generation 1 before the ring broke; generation 2
    /// continues from step 3, so that step 4 (and a late report of it) does not count.
    #[test]
    fn steps_rolled_back_by_a_new_generation_are_dropped() {
        let store = Store::open(tempfile::tempdir().unwrap().path().to_str().unwrap()).unwrap();
        let sink = MetricsSink::new(store, 1000);
        for s in 1..=3 {
            sink.record(&m("a", 1, s));
            sink.record(&m("b", 1, s));
        }
        sink.record(&m("a", 1, 4));
        sink.generation_formed(2, std::time::Instant::now());
        sink.record(&m("b", 2, 4));
        sink.record(&m("a", 1, 4)); // late
        sink.record(&m("a", 2, 4));
        let got = steps(&sink);
        assert_eq!(
            got,
            vec![
                (1, 1),
                (1, 1),
                (1, 2),
                (1, 2),
                (1, 3),
                (1, 3),
                (2, 4),
                (2, 4)
            ]
        );
        let l = sink.lines.lock().unwrap();
        assert!(l.lines.iter().any(|x| x.text.contains("\"recovered\"")));
    }
}
