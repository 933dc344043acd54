//! A trainer's loop: steps from the loader until the run ends, is stopped or preempted,
//! or re-forms the cluster; evaluation, early stopping, checkpoints and the metrics log
//! along the way.

use std::time::Instant;

use serde::Serialize;

use scfm_common::metrics_log::{Record, StepLine};

use super::{RunOptions, StepReport, Trainer, loader_config};
use crate::data::{Loader, advance};
use crate::error::Result;
use crate::step::check_params_identical;

impl Trainer {
    /// Trains until the end of the run (or `stop_after` steps, or early stopping).
    pub fn run(&mut self, opts: &RunOptions) -> Result<RunSummary> {
        let lcfg = loader_config(&self.spec, &self.ctx);
        let per_step = lcfg.cells_per_step();
        let n_train = self.order.n_train();
        let loader = Loader::start(
            self.source.clone(),
            self.order.clone(),
            &self.spec.model,
            lcfg,
            self.state.epoch,
            self.state.position,
        );
        let start_step = self.state.step;
        let bar = indicatif::ProgressBar::new(self.total_steps);
        bar.set_position(start_step);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("template"),
        );
        let (mut first_mgem, mut last_mgem, mut wait_total, mut time_total) = (None, 0.0, 0.0, 0.0);
        let mut stopped_early = false;
        let mut preempted = false;
        let mut reform = false;
        let run_start = Instant::now();
        let mut last_trim = Instant::now();
        while self.state.step < self.total_steps {
            // The job ended for this worker (the coordinator's order): leave at once.
            self.control.check()?;
            if opts
                .stop_after
                .is_some_and(|n| self.state.step - start_step >= n)
            {
                break;
            }
            let w0 = Instant::now();
            let data = loader.next()?;
            let wait = w0.elapsed().as_secs_f64();
            debug_assert_eq!(
                (data.epoch, data.position),
                (self.state.epoch, self.state.position)
            );
            let mut s = self.train_step(&data)?;
            s.data_wait_s = wait;
            s.cells_per_s = (per_step as f64) / (wait + s.compute_s);
            wait_total += wait;
            time_total += wait + s.compute_s;
            first_mgem.get_or_insert(s.mgem);
            last_mgem = s.mgem;
            (self.state.epoch, self.state.position) =
                advance(data.epoch, data.position, per_step, n_train);
            // After the cursor moved: a failure here leaves a consistent completed step.
            if self.state.step.is_multiple_of(self.ctx.checksum_every) {
                check_params_identical(
                    &self.params,
                    self.ctx.collective.as_mut(),
                    self.state.step,
                )?;
            }
            let epoch_end = self.state.epoch > data.epoch;
            let line = Record::Step(StepLine {
                worker: None,
                generation: self.ctx.generation,
                step: s.step,
                epoch: data.epoch,
                loss: s.loss,
                mgem: s.mgem,
                contrastive: s.contrastive,
                gepc: s.gepc,
                grad_norm: s.grad_norm,
                lr: s.lr,
                cells_per_s: s.cells_per_s,
                data_wait_s: s.data_wait_s,
                compute_s: s.compute_s,
                allreduce_s: s.allreduce_s,
                allreduce_wait_s: s.allreduce_wait_s,
                step_s: s.data_wait_s + s.compute_s,
                val_loss: None,
                offset: data.epoch * n_train as u64 + data.position as u64,
                step_cells: per_step as u64,
                rank: self.ctx.collective.rank() as u32,
                world_size: self.ctx.collective.world_size() as u32,
                total_steps: self.total_steps,
            });
            if opts.json {
                println!("{}", line.to_line());
            }
            self.log_record(&line);
            // Freed tensor memory left in the heap's holes goes back to the kernel about
            // once a minute, so the resident size stays near what a step uses.
            if last_trim.elapsed() >= HEAP_TRIM_INTERVAL {
                scfm_common::alloc::release_free_heap();
                last_trim = Instant::now();
            }
            bar.set_position(self.state.step);
            bar.set_message(format!(
                "loss {:.4} mgem {:.4} nt-xent {:.4}",
                s.loss, s.mgem, s.contrastive
            ));
            if self.state.step.is_multiple_of(self.spec.training.log_every)
                && self.ctx.collective.rank() == 0
            {
                tracing::info!(
                    step = s.step,
                    loss = s.loss,
                    mgem = s.mgem,
                    contrastive = s.contrastive,
                    grad_norm = s.grad_norm,
                    lr = s.lr,
                    cells_per_s = s.cells_per_s as u64,
                    data_wait_s = s.data_wait_s,
                    padded_len = s.padded_len,
                    rss_mib = scfm_common::alloc::resident_bytes().unwrap_or(0) >> 20,
                    "train"
                );
            }
            let last = self.state.step == self.total_steps;
            let do_eval = self
                .state
                .step
                .is_multiple_of(self.spec.training.eval_every)
                || epoch_end
                || last;
            let do_save = self
                .state
                .step
                .is_multiple_of(self.spec.checkpoint.every_steps)
                || last;
            let mut val_loss = None;
            if do_eval && let Some((val, vm, vc)) = self.evaluate()? {
                val_loss = Some(val);
                stopped_early = self
                    .state
                    .observe_val(val, self.spec.training.early_stopping_patience);
                let checkpointed = do_save || stopped_early;
                let ev = Record::Eval {
                    step: self.state.step,
                    val_loss: val,
                    val_mgem: vm,
                    val_contrastive: vc,
                    checkpointed,
                };
                if opts.json {
                    println!("{}", ev.to_line());
                }
                if checkpointed && self.best.is_none_or(|(b, _)| val < b) {
                    self.best = Some((val, self.state.step));
                }
                if self.ctx.collective.rank() == 0 {
                    tracing::info!(
                        step = self.state.step,
                        val_loss = val,
                        val_mgem = vm,
                        val_contrastive = vc,
                        "eval"
                    );
                }
                self.log_record(&ev);
                if stopped_early {
                    tracing::info!(
                        step = self.state.step,
                        best = self.state.best_val,
                        "early stopping: validation loss stopped improving"
                    );
                }
            }
            let stop = s.stop && !last;
            if do_save || stopped_early || stop {
                self.save()?;
            }
            if let Some(tx) = &self.ctx.reporter {
                // The coordinator stream may be gone (it then stops us by heartbeat).
                let _ = tx.send(StepReport {
                    stats: s.clone(),
                    epoch: data.epoch,
                    generation: self.ctx.generation,
                    val_loss,
                    offset: data.epoch * n_train as u64 + data.position as u64,
                    step_cells: per_step as u64,
                    rank: self.ctx.collective.rank(),
                    world: self.ctx.collective.world_size(),
                    total_steps: self.total_steps,
                });
            }
            if stopped_early {
                break;
            }
            if stop {
                tracing::info!(
                    step = self.state.step,
                    "preempted: checkpoint saved, stopping"
                );
                preempted = true;
                break;
            }
            if s.reform && !last {
                tracing::info!(
                    step = self.state.step,
                    "membership changes: leaving for the next generation"
                );
                reform = true;
                break;
            }
        }
        // Every worker must end with the same parameters.
        check_params_identical(&self.params, self.ctx.collective.as_mut(), self.state.step)?;
        if opts.stop_after.is_some()
            && self.state.step < self.total_steps
            && !stopped_early
            && !preempted
            && !reform
        {
            self.save()?;
        }
        self.flush_checkpoint()?;
        bar.finish_and_clear();
        let summary = RunSummary {
            steps: self.state.step,
            steps_this_run: self.state.step - start_step,
            first_mgem,
            last_mgem,
            best_val: self.state.best_val,
            stopped_early,
            preempted,
            reform,
            data_wait_fraction: if time_total > 0.0 {
                wait_total / time_total
            } else {
                0.0
            },
            seconds: run_start.elapsed().as_secs_f64(),
            fingerprint: format!("{:016x}", crate::step::param_fingerprint(&self.params)?),
            checkpoint: self.store.url().to_string(),
        };
        Ok(summary)
    }
}

/// What a run reports at the end.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Steps completed in total.
    pub steps: u64,
    /// Steps run by this process.
    pub steps_this_run: u64,
    /// MGEM loss of the first step of this process.
    pub first_mgem: Option<f64>,
    /// MGEM loss of the last step.
    pub last_mgem: f64,
    /// Best validation loss.
    pub best_val: Option<f64>,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Whether a preemption ended the run (after a checkpoint; relaunch to resume).
    pub preempted: bool,
    /// Whether the run stopped to re-form the cluster (the worker continues in the next
    /// generation).
    pub reform: bool,
    /// Fraction of wall time spent waiting for data.
    pub data_wait_fraction: f64,
    /// Wall seconds of the loop.
    pub seconds: f64,
    /// Checkpoint store URL.
    pub checkpoint: String,
    /// FNV-1a fingerprint of the final parameters (equal on every worker).
    pub fingerprint: String,
}

/// How often the training loop hands the heap's free memory back to the kernel
/// ([`scfm_common::alloc::release_free_heap`]).
const HEAP_TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
