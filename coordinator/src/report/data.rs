//! A run's metrics log (see [`scfm_common::metrics_log`]) parsed and aggregated per step.
//!
//! One schema of lines ([`scfm_common::metrics_log::Record`]), from two writers:
//! - the coordinator of a cluster (`scfm launch` / `scfm local`): one `"event": "step"`
//!   line per worker and step, with `worker`, `generation`, `rank`, `world_size`,
//!   `step_s`, `step_cells` and `val_loss` (null unless evaluated at that step), plus
//!   `generation` events (a new membership: `generation`, `world_size`) and `recovered`
//!   events (`generation`, `first_step`, `seconds`);
//! - a single process (`scfm train` / `scfm-worker train`): one `"event": "step"` line per
//!   step (no `worker`, world size 1, generation 0), plus `eval` events (`val_loss`,
//!   `val_mgem`, `val_contrastive`), `checkpoint` and `checkpoint_wait` events.
//!
//! Both write `rollback` lines (`to_step`) when the run continues from an earlier step:
//! the lines before one of later steps no longer count. Lines of older scfm versions
//! (`compute_s` without `step_s`, no `event`) are read too.
//!
//! A line that is not a JSON object, or a step line without a numeric `step`, is an error
//! naming the object and line number: parts are written atomically, so such a line means
//! it is not what this command expects, and plots of a partly read log would mislead.
//! Events of other kinds are counted and otherwise ignored (newer writers may add some).

use std::collections::BTreeMap;

use serde_json::Value;

use super::ReportError;

/// One step of the run, aggregated over the workers that reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPoint {
    /// Step number (1-based).
    pub step: u64,
    /// Epoch of the step (0-based).
    pub epoch: u64,
    /// Membership generation that ran it (0 for a single process).
    pub generation: u64,
    /// Workers in that generation (1 for a single process).
    pub world_size: u64,
    /// Lines (workers) that reported the step.
    pub reports: usize,
    /// Global loss (all-reduced, the same on every rank).
    pub loss: Option<f64>,
    /// Global MGEM loss.
    pub mgem: Option<f64>,
    /// Global NT-Xent loss.
    pub contrastive: Option<f64>,
    /// Gradient norm before clipping.
    pub grad_norm: Option<f64>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Cells per second of the whole job: every worker's `cells_per_s` already counts the
    /// cells of all ranks over its own step time, so this is the smallest one (the
    /// slowest rank sets the pace of a synchronous step).
    pub cells_per_s: Option<f64>,
    /// Data wait, maximum over ranks (seconds).
    pub data_wait_max: Option<f64>,
    /// Data wait, mean over ranks (seconds).
    pub data_wait_mean: Option<f64>,
    /// Gradient all-reduce, maximum over ranks (seconds).
    pub allreduce_max: Option<f64>,
    /// Gradient all-reduce, mean over ranks (seconds).
    pub allreduce_mean: Option<f64>,
    /// The time the step waited for the all-reduce after its backward pass (all of it
    /// unless overlapped), maximum over ranks (seconds); `None` in logs without it.
    pub allreduce_wait_max: Option<f64>,
    /// Step time (data wait + compute), maximum over ranks (seconds).
    pub step_s: Option<f64>,
}

/// A validation result.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPoint {
    /// Step it was evaluated at.
    pub step: u64,
    /// Validation loss.
    pub val_loss: f64,
    /// Validation MGEM loss (single-process runs log it).
    pub val_mgem: Option<f64>,
    /// Validation NT-Xent loss (single-process runs log it).
    pub val_contrastive: Option<f64>,
}

/// A new generation formed after a membership change.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// The new generation.
    pub generation: u64,
    /// Its first step.
    pub first_step: u64,
    /// Seconds from noticing the change to that first step.
    pub seconds: f64,
}

/// Everything the metrics log says about a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Steps, ascending.
    pub steps: Vec<StepPoint>,
    /// Validation results, ascending by step.
    pub evals: Vec<EvalPoint>,
    /// `(generation, world size)` of each `generation` event, in file order.
    pub generations: Vec<(u64, u64)>,
    /// Recoveries after membership changes.
    pub recoveries: Vec<Recovery>,
    /// Steps of `checkpoint` events (single-process runs log them).
    pub checkpoint_events: Vec<u64>,
    /// Lines of other event kinds, counted by kind.
    pub other_events: BTreeMap<String, usize>,
}

/// One step line, as written.
#[derive(Debug, Clone)]
struct StepLine {
    step: u64,
    epoch: u64,
    generation: u64,
    world_size: u64,
    rank: u64,
    loss: Option<f64>,
    mgem: Option<f64>,
    contrastive: Option<f64>,
    grad_norm: Option<f64>,
    lr: Option<f64>,
    cells_per_s: Option<f64>,
    data_wait_s: Option<f64>,
    allreduce_s: Option<f64>,
    allreduce_wait_s: Option<f64>,
    step_s: Option<f64>,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64).filter(|x| x.is_finite())
}

fn int(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

impl StepLine {
    fn of(v: &Value, step: u64) -> StepLine {
        let data_wait_s = num(v, "data_wait_s");
        // A single process logs compute_s; a cluster's coordinator logs step_s.
        let step_s = num(v, "step_s").or_else(|| Some(num(v, "compute_s")? + data_wait_s?));
        StepLine {
            step,
            epoch: int(v, "epoch").unwrap_or(0),
            generation: int(v, "generation").unwrap_or(0),
            world_size: int(v, "world_size").unwrap_or(1),
            rank: int(v, "rank").unwrap_or(0),
            loss: num(v, "loss"),
            mgem: num(v, "mgem"),
            contrastive: num(v, "contrastive"),
            grad_norm: num(v, "grad_norm"),
            lr: num(v, "lr"),
            cells_per_s: num(v, "cells_per_s"),
            data_wait_s,
            allreduce_s: num(v, "allreduce_s"),
            allreduce_wait_s: num(v, "allreduce_wait_s"),
            step_s,
        }
    }
}

fn max(xs: impl Iterator<Item = f64>) -> Option<f64> {
    xs.fold(None, |m, x| Some(m.map_or(x, |m: f64| m.max(x))))
}

fn min(xs: impl Iterator<Item = f64>) -> Option<f64> {
    xs.fold(None, |m, x| Some(m.map_or(x, |m: f64| m.min(x))))
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (n, s) = xs.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    (n > 0).then(|| s / n as f64)
}

/// Aggregates the lines of one step. Only the newest generation's lines count (an older
/// generation's report of a step that a later one redid was rolled back).
fn aggregate(mut lines: Vec<StepLine>) -> StepPoint {
    let generation = lines.iter().map(|l| l.generation).max().unwrap_or(0);
    lines.retain(|l| l.generation == generation);
    lines.sort_by_key(|l| l.rank);
    let first = |f: fn(&StepLine) -> Option<f64>| lines.iter().find_map(f);
    let all = |f: fn(&StepLine) -> Option<f64>| lines.iter().filter_map(f);
    StepPoint {
        step: lines[0].step,
        epoch: lines.iter().map(|l| l.epoch).max().unwrap_or(0),
        generation,
        world_size: lines.iter().map(|l| l.world_size).max().unwrap_or(1),
        reports: lines.len(),
        loss: first(|l| l.loss),
        mgem: first(|l| l.mgem),
        contrastive: first(|l| l.contrastive),
        grad_norm: first(|l| l.grad_norm),
        lr: first(|l| l.lr),
        cells_per_s: min(all(|l| l.cells_per_s)),
        data_wait_max: max(all(|l| l.data_wait_s)),
        data_wait_mean: mean(all(|l| l.data_wait_s)),
        allreduce_max: max(all(|l| l.allreduce_s)),
        allreduce_mean: mean(all(|l| l.allreduce_s)),
        allreduce_wait_max: max(all(|l| l.allreduce_wait_s)),
        step_s: max(all(|l| l.step_s)),
    }
}

/// Parses the text of one metrics object at `url` (named in errors).
pub fn parse(text: &str, url: &str) -> Result<Metrics, ReportError> {
    let mut p = Parser::default();
    p.feed(text, url)?;
    Ok(p.finish())
}

/// Reads a run's metrics log object by object, in order ([`Parser::feed`]), and
/// aggregates it ([`Parser::finish`]). A `rollback` line discards what came before it of
/// the steps after its `to_step`.
#[derive(Debug, Default)]
pub struct Parser {
    m: Metrics,
    by_step: BTreeMap<u64, Vec<StepLine>>,
    evals: BTreeMap<u64, EvalPoint>,
}

impl Parser {
    /// Takes the lines of the next object of the log, at `url` (named in errors).
    pub fn feed(&mut self, text: &str, url: &str) -> Result<(), ReportError> {
        let Parser { m, by_step, evals } = self;
        for (i, raw) in text.lines().enumerate() {
            let bad = |message: String| ReportError::Malformed {
                url: url.to_string(),
                line: i + 1,
                message,
            };
            if raw.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(raw).map_err(|e| bad(format!("not JSON: {e}")))?;
            if !v.is_object() {
                return Err(bad("not a JSON object".into()));
            }
            // Lines of older writers have no `event`; a `loss` makes them steps.
            let event = match v.get("event").and_then(Value::as_str) {
                Some(e) => e,
                None if v.get("loss").is_some() => "step",
                None => "",
            };
            match event {
                "step" => {
                    let step = int(&v, "step")
                        .ok_or_else(|| bad("a step line without a numeric `step`".into()))?;
                    if let Some(val) = num(&v, "val_loss") {
                        evals.entry(step).or_insert(EvalPoint {
                            step,
                            val_loss: val,
                            val_mgem: None,
                            val_contrastive: None,
                        });
                    }
                    by_step
                        .entry(step)
                        .or_default()
                        .push(StepLine::of(&v, step));
                }
                "eval" => {
                    let (Some(step), Some(val)) = (int(&v, "step"), num(&v, "val_loss")) else {
                        return Err(bad("an eval line without `step` and `val_loss`".into()));
                    };
                    evals.insert(
                        step,
                        EvalPoint {
                            step,
                            val_loss: val,
                            val_mgem: num(&v, "val_mgem"),
                            val_contrastive: num(&v, "val_contrastive"),
                        },
                    );
                }
                "generation" => m.generations.push((
                    int(&v, "generation").unwrap_or(0),
                    int(&v, "world_size").unwrap_or(0),
                )),
                "recovered" => m.recoveries.push(Recovery {
                    generation: int(&v, "generation").unwrap_or(0),
                    first_step: int(&v, "first_step").unwrap_or(0),
                    seconds: num(&v, "seconds").unwrap_or(f64::NAN),
                }),
                "checkpoint" => m.checkpoint_events.extend(int(&v, "step")),
                "rollback" => {
                    let to = int(&v, "to_step")
                        .ok_or_else(|| bad("a rollback line without a numeric `to_step`".into()))?;
                    by_step.retain(|&s, _| s <= to);
                    evals.retain(|&s, _| s <= to);
                    m.checkpoint_events.retain(|&s| s <= to);
                    *m.other_events.entry("rollback".into()).or_default() += 1;
                }
                other => {
                    let kind = if other.is_empty() { "(none)" } else { other };
                    *m.other_events.entry(kind.to_string()).or_default() += 1;
                }
            }
        }
        Ok(())
    }

    /// The aggregated metrics.
    pub fn finish(self) -> Metrics {
        let mut m = self.m;
        m.steps = self.by_step.into_values().map(aggregate).collect();
        m.evals = self.evals.into_values().collect();
        m.checkpoint_events.sort_unstable();
        m.checkpoint_events.dedup();
        m
    }
}

impl Metrics {
    /// The last step.
    pub fn last(&self) -> Option<&StepPoint> {
        self.steps.last()
    }

    /// Sum of the step times (slowest rank per step), seconds; excludes pauses between
    /// steps (evaluation, checkpoints, re-formations).
    pub fn step_time_total(&self) -> f64 {
        self.steps.iter().filter_map(|s| s.step_s).sum()
    }

    /// Sum of the data waits (slowest rank per step), seconds.
    pub fn data_wait_total(&self) -> f64 {
        self.steps.iter().filter_map(|s| s.data_wait_max).sum()
    }

    /// Largest world size of any step.
    pub fn max_world_size(&self) -> u64 {
        self.steps.iter().map(|s| s.world_size).max().unwrap_or(0)
    }

    /// Generations that ran steps, ascending.
    pub fn step_generations(&self) -> Vec<u64> {
        let mut g: Vec<u64> = self.steps.iter().map(|s| s.generation).collect();
        g.dedup();
        g.sort_unstable();
        g.dedup();
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster_line(step: u64, rank: u64, world: u64, generation: u64) -> String {
        serde_json::json!({
            "event": "step", "worker": format!("w{rank}"), "generation": generation, "step": step,
            "epoch": 0, "loss": 5.0 - step as f64 * 0.1, "mgem": 4.0, "contrastive": 1.0,
            "grad_norm": 2.0, "lr": 1e-3, "cells_per_s": 100.0 + rank as f64,
            "data_wait_s": 0.01 * (rank + 1) as f64, "allreduce_s": 0.002 * (rank + 1) as f64,
            "allreduce_wait_s": 0.001 * (rank + 1) as f64,
            "step_s": 0.1 + 0.01 * rank as f64,
            "val_loss": if step == 2 { serde_json::json!(4.5) } else { Value::Null },
            "offset": 0, "step_cells": 16, "rank": rank, "world_size": world,
        })
        .to_string()
    }

    #[test]
    fn cluster_lines_are_aggregated_over_ranks() {
        let mut text = String::new();
        text.push_str(r#"{"event":"generation","generation":1,"world_size":2,"hold":false,"ready_after_s":0.0}"#);
        text.push('\n');
        for step in 1..=3 {
            for rank in 0..2 {
                text.push_str(&cluster_line(step, rank, 2, 1));
                text.push('\n');
            }
        }
        let m = parse(&text, "file:///run").unwrap();
        assert_eq!(m.steps.len(), 3);
        let s = &m.steps[1];
        assert_eq!(
            (s.step, s.world_size, s.generation, s.reports),
            (2, 2, 1, 2)
        );
        assert_eq!(s.loss, Some(4.8));
        assert_eq!(s.cells_per_s, Some(100.0), "the slowest rank's rate");
        assert_eq!(s.data_wait_max, Some(0.02));
        assert_eq!(s.allreduce_wait_max, Some(0.002));
        assert!((s.data_wait_mean.unwrap() - 0.015).abs() < 1e-12);
        assert_eq!(s.allreduce_max, Some(0.004));
        assert_eq!(s.step_s, Some(0.11));
        assert_eq!(m.evals.len(), 1);
        assert_eq!((m.evals[0].step, m.evals[0].val_loss), (2, 4.5));
        assert_eq!(m.generations, vec![(1, 2)]);
        assert!((m.step_time_total() - 0.33).abs() < 1e-12);
    }

    #[test]
    fn a_newer_generation_replaces_an_older_report_of_the_same_step() {
        let text = [
            cluster_line(1, 0, 2, 1),
            cluster_line(1, 1, 2, 1),
            cluster_line(2, 0, 2, 1),
            cluster_line(2, 0, 1, 2),
            r#"{"event":"recovered","generation":2,"first_step":2,"seconds":1.5}"#.into(),
        ]
        .join("\n");
        let m = parse(&text, "u").unwrap();
        assert_eq!(m.steps[1].generation, 2);
        assert_eq!(m.steps[1].world_size, 1);
        assert_eq!(m.steps[1].reports, 1);
        assert_eq!(m.step_generations(), vec![1, 2]);
        assert_eq!(
            m.recoveries,
            vec![Recovery {
                generation: 2,
                first_step: 2,
                seconds: 1.5
            }]
        );
    }

    #[test]
    fn single_process_lines_and_events() {
        let text = r#"{"step":1,"loss":3.0,"mgem":2.5,"contrastive":0.5,"grad_norm":1.0,"lr":0.001,"data_wait_s":0.5,"compute_s":1.5,"allreduce_s":0.0,"cells_per_s":8.0,"event":"step","epoch":0}
{"event":"eval","step":1,"val_loss":2.9,"val_mgem":2.4,"val_contrastive":0.5,"checkpointed":true}
{"event":"checkpoint","step":1,"stall_s":0.01}
{"event":"checkpoint_wait","step":1,"wait_s":0.2}

{"step":2,"loss":2.0,"mgem":1.5,"contrastive":0.5,"grad_norm":1.0,"lr":0.001,"data_wait_s":0.0,"compute_s":1.0,"allreduce_s":0.0,"cells_per_s":8.0,"event":"step","epoch":1}
"#;
        let m = parse(text, "u").unwrap();
        assert_eq!(m.steps.len(), 2);
        assert_eq!(m.steps[0].world_size, 1);
        assert_eq!(m.steps[0].step_s, Some(2.0), "data wait + compute");
        assert_eq!(m.steps[1].epoch, 1);
        assert_eq!(m.evals[0].val_mgem, Some(2.4));
        assert_eq!(m.checkpoint_events, vec![1]);
        assert_eq!(m.other_events.get("checkpoint_wait"), Some(&1));
        assert_eq!(m.step_time_total(), 3.0);
        assert_eq!(m.data_wait_total(), 0.5);
        assert_eq!(m.max_world_size(), 1);
    }

    /// A rollback in a later part discards the earlier parts' lines of later steps (their
    /// validation and checkpoint too); the steps run again count once.
    #[test]
    fn rollbacks_across_parts_discard_the_undone_steps() {
        let mut p = Parser::default();
        let first: String = (1..=4).map(|s| cluster_line(s, 0, 1, 1) + "\n").collect();
        p.feed(&first, "run/metrics/part-000000.jsonl").unwrap();
        p.feed(
            "{\"event\":\"checkpoint\",\"step\":3,\"stall_s\":0.1}\n",
            "run/metrics/part-000001.jsonl",
        )
        .unwrap();
        let again = format!(
            "{}\n{}\n{}\n",
            r#"{"event":"rollback","to_step":1,"generation":0,"reason":"resume"}"#,
            cluster_line(2, 0, 1, 1).replace("\"loss\":4.8", "\"loss\":9.0"),
            cluster_line(3, 0, 1, 1)
        );
        p.feed(&again, "run/metrics/part-000002.jsonl").unwrap();
        let m = p.finish();
        let steps: Vec<(u64, usize)> = m.steps.iter().map(|s| (s.step, s.reports)).collect();
        assert_eq!(steps, vec![(1, 1), (2, 1), (3, 1)]);
        assert_eq!(m.steps[1].loss, Some(9.0), "the step run again counts");
        assert!(m.checkpoint_events.is_empty());
        assert_eq!(m.evals.len(), 1, "step 2's validation came again");
        assert_eq!(m.other_events.get("rollback"), Some(&1));
        let mut p = Parser::default();
        let e = p
            .feed(
                "{\"event\":\"rollback\"}\n",
                "run/metrics/part-000009.jsonl",
            )
            .unwrap_err();
        assert!(e.to_string().contains("part-000009.jsonl line 1"), "{e}");
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        let good = cluster_line(1, 0, 1, 1);
        let e = parse(
            &format!("{good}\n{{\"step\": 2, \"loss\"\n"),
            "s3://b/run/metrics.jsonl",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("s3://b/run/metrics.jsonl line 2"), "{msg}");
        let e = parse(&format!("{good}\n[1,2]\n"), "u").unwrap_err();
        assert!(e.to_string().contains("line 2: not a JSON object"), "{e}");
        let e = parse(r#"{"event":"step","loss":1.0}"#, "u").unwrap_err();
        assert!(e.to_string().contains("line 1: a step line without"), "{e}");
    }
}
