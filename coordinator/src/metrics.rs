//! Metrics aggregation: per-step metrics streamed by workers become log lines,
//! Prometheus gauges and `metrics.jsonl` next to the checkpoints.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use scfm_common::rpc::pb;
use scfm_common::storage::Store;

/// Collects step metrics from every worker.
pub struct MetricsSink {
    lines: Mutex<Vec<String>>,
    last_step: AtomicU64,
    log_every: u64,
    store: Store,
}

impl MetricsSink {
    /// Writes `metrics.jsonl` into `store`; logs every `log_every` steps.
    pub fn new(store: Store, log_every: u64) -> Self {
        MetricsSink {
            lines: Mutex::new(Vec::new()),
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
                lines.push(l.to_string());
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
        });
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line.to_string());
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

    /// Highest step reported so far.
    pub fn last_step(&self) -> u64 {
        self.last_step.load(Ordering::SeqCst)
    }

    /// Writes all lines to `metrics.jsonl` in the checkpoint store.
    pub async fn flush(&self) -> scfm_common::Result<()> {
        let text = {
            let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            if lines.is_empty() {
                return Ok(());
            }
            let mut t = lines.join("\n");
            t.push('\n');
            t
        };
        self.store.put("metrics.jsonl", Bytes::from(text)).await
    }
}
