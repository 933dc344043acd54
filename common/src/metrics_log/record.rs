//! The one schema of metrics lines, for single-process and cluster runs.

use serde::{Deserialize, Deserializer, Serialize};

/// A number that JSON may hold as `null` (serde_json writes NaN and infinities so).
fn num<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One optimizer step as one process saw it: a cluster writes one per worker and step
/// (losses are global, equal on every worker; throughput and timings are the worker's
/// own), a single process one per step (`worker` absent, generation 0, rank 0, world size 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLine {
    /// Worker id (`w0000`, …); absent for a single process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Membership generation that ran the step (0: a single process).
    #[serde(default)]
    pub generation: u64,
    /// Step number (1-based, after the update).
    pub step: u64,
    /// Epoch of the step's first cell.
    #[serde(default)]
    pub epoch: u64,
    /// Weighted total loss.
    #[serde(deserialize_with = "num")]
    pub loss: f64,
    /// MGEM loss.
    #[serde(deserialize_with = "num")]
    pub mgem: f64,
    /// NT-Xent loss.
    #[serde(deserialize_with = "num")]
    pub contrastive: f64,
    /// GEPC decoder loss (0 without the decoder).
    #[serde(default, deserialize_with = "num")]
    pub gepc: f64,
    /// Gradient norm before clipping.
    #[serde(deserialize_with = "num")]
    pub grad_norm: f64,
    /// Learning rate used.
    #[serde(deserialize_with = "num")]
    pub lr: f64,
    /// Cells per second of the step (all workers' cells over this process's step time).
    #[serde(deserialize_with = "num")]
    pub cells_per_s: f64,
    /// Seconds waiting for data.
    #[serde(deserialize_with = "num")]
    pub data_wait_s: f64,
    /// Seconds of compute (forward, backward, all-reduce, update).
    #[serde(deserialize_with = "num")]
    pub compute_s: f64,
    /// Seconds of the gradient all-reduce.
    #[serde(deserialize_with = "num")]
    pub allreduce_s: f64,
    /// Seconds the step waited for the gradient all-reduce after its backward pass: all of
    /// `allreduce_s` unless it ran during the backward pass (`cluster.overlap_allreduce`),
    /// then the part the backward pass did not hide plus the hand-off to and from the
    /// communication thread (for a tiny model on a loaded machine that can exceed
    /// `allreduce_s`). Absent in logs older than the field (read as 0).
    #[serde(default, deserialize_with = "num")]
    pub allreduce_wait_s: f64,
    /// Step time: data wait + compute.
    #[serde(deserialize_with = "num")]
    pub step_s: f64,
    /// Validation loss when the cluster evaluated at this step (`null` otherwise; a single
    /// process writes an `eval` line instead).
    pub val_loss: Option<f64>,
    /// The step's place in the data stream: `epoch * n_train + position` before it.
    #[serde(default)]
    pub offset: u64,
    /// Cells of the step over all workers.
    #[serde(default)]
    pub step_cells: u64,
    /// Rank of the worker.
    #[serde(default)]
    pub rank: u32,
    /// Workers in the generation.
    #[serde(default)]
    pub world_size: u32,
    /// The run's length in steps as planned at this step (0: unknown).
    #[serde(default)]
    pub total_steps: u64,
}

/// One line of the metrics log, tagged by `event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    /// An optimizer step.
    Step(StepLine),
    /// A validation (single process).
    Eval {
        /// Step evaluated at.
        step: u64,
        /// Validation loss.
        #[serde(deserialize_with = "num")]
        val_loss: f64,
        /// Validation MGEM loss.
        #[serde(deserialize_with = "num")]
        val_mgem: f64,
        /// Validation NT-Xent loss.
        #[serde(deserialize_with = "num")]
        val_contrastive: f64,
        /// Whether a checkpoint was written at this step.
        checkpointed: bool,
    },
    /// A checkpoint handed to the uploader (single process).
    Checkpoint {
        /// Its step.
        step: u64,
        /// Seconds the training thread spent on it.
        #[serde(deserialize_with = "num")]
        stall_s: f64,
    },
    /// The training thread waited for a checkpoint's encoding (single process).
    CheckpointWait {
        /// Step.
        step: u64,
        /// Seconds waited.
        #[serde(deserialize_with = "num")]
        wait_s: f64,
    },
    /// A generation formed (cluster).
    Generation {
        /// Its number.
        generation: u64,
        /// Its members.
        world_size: u64,
        /// It holds below `min_workers`.
        hold: bool,
        /// Seconds from the membership change to the generation.
        #[serde(deserialize_with = "num")]
        ready_after_s: f64,
    },
    /// The first step of a generation formed after a membership change (cluster).
    Recovered {
        /// The generation.
        generation: u64,
        /// Its first step.
        first_step: u64,
        /// Seconds from noticing the change to that step.
        #[serde(deserialize_with = "num")]
        seconds: f64,
    },
    /// The run continues from `to_step`: earlier lines with a higher step no longer count.
    Rollback {
        /// The step the run continues from.
        to_step: u64,
        /// The generation that continued (0: a resume, or a single process).
        generation: u64,
        /// `resume` (from a checkpoint) or `generation` (a new generation undid steps).
        reason: String,
    },
}

impl Record {
    /// The record as one JSON line (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a metrics record serializes")
    }

    /// The step it belongs to, if any.
    pub fn step(&self) -> Option<u64> {
        match self {
            Record::Step(s) => Some(s.step),
            Record::Eval { step, .. }
            | Record::Checkpoint { step, .. }
            | Record::CheckpointWait { step, .. } => Some(*step),
            _ => None,
        }
    }
}
