//! What the coordinator knows of the run's progress for `scfm status`: the latest step,
//! the latest validation loss and the step rate, from step reports or metrics lines.

use std::collections::VecDeque;
use std::time::Instant;

use scfm_common::rpc::pb;

/// The cluster's latest step as its first report told it (losses are global), read back
/// from a metrics line too.
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
    /// A metrics step line (`"event": "step"`), or `None` for other lines.
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

/// A validation loss found in a metrics line (a step line with `val_loss`, or an `eval`
/// event): `(step, val_loss)`.
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

/// The latest step, validation loss and arrival times of recent steps.
#[derive(Default)]
pub(super) struct Tracker {
    pub(super) last: Option<LastStep>,
    pub(super) val: Option<(u64, f64)>,
    /// `(when its first report arrived, step)`, oldest first, of the current generation.
    times: VecDeque<(Instant, u64)>,
}

impl Tracker {
    pub(super) fn record(&mut self, m: &pb::StepMetrics) {
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
        self.times.push_back((Instant::now(), m.step));
        if self.times.len() > RATE_WINDOW {
            self.times.pop_front();
        }
    }

    /// Takes what earlier lines of the log say (steps up to `upto`): the latest step, as
    /// of generation 0 so that any step of this coordinator's generations is newer.
    pub(super) fn preload(&mut self, lines: &[serde_json::Value], upto: u64) {
        for v in lines {
            if v["step"].as_u64().is_none_or(|s| s > upto) {
                continue;
            }
            if let Some(last) = LastStep::from_line(v)
                && self.last.as_ref().is_none_or(|l| last.step >= l.step)
            {
                self.last = Some(LastStep {
                    generation: 0,
                    ..last
                });
            }
            if let Some(val) = val_of_line(v) {
                self.val = Some(val);
            }
        }
    }

    pub(super) fn steps_per_s(&self) -> Option<f64> {
        let (&(t0, s0), &(t1, s1)) = (self.times.front()?, self.times.back()?);
        let dt = t1.duration_since(t0).as_secs_f64();
        (s1 > s0 && dt > 0.0).then(|| (s1 - s0) as f64 / dt)
    }
}
