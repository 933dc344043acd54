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

/// Collects step metrics from every worker. Steps that a later generation rolled back
/// (a survivor completed them in a generation that lost a worker) are dropped, so the
/// file holds the steps that count: with `offset` (the step's place in the data stream,
/// `epoch * n_train + position`), `step_cells` and `rank`/`world_size` per worker line it
/// accounts for every cell consumed.
pub struct MetricsSink {
    lines: Mutex<Lines>,
    last_step: AtomicU64,
    log_every: u64,
    store: Store,
}

impl MetricsSink {
    /// Writes `metrics.jsonl` into `store`; logs every `log_every` steps.
    pub fn new(store: Store, log_every: u64) -> Self {
        MetricsSink {
            lines: Mutex::new(Lines::default()),
            last_step: AtomicU64::new(0),
            log_every: log_every.max(1),
            store,
        }
    }

    /// Keeps the lines of an earlier `metrics.jsonl` whose step is at most `upto` (the run
    /// continues from there), so the file keeps the whole run's history.
    pub fn preload(&self, text: &str, upto: u64) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        for l in text.lines() {
            let step = serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64());
            if let Some(s) = step.filter(|&s| s <= upto) {
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
            "loss": m.loss, "mgem": m.mgem, "contrastive": m.contrastive, "grad_norm": m.grad_norm, "lr": m.lr,
            "cells_per_s": m.cells_per_s, "data_wait_s": m.data_wait_s, "allreduce_s": m.allreduce_s, "step_s": m.step_s,
            "val_loss": if m.val_loss.is_nan() { serde_json::Value::Null } else { m.val_loss.into() },
            "offset": m.offset, "step_cells": m.step_cells, "rank": m.rank, "world_size": m.world_size,
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
