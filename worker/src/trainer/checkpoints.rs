//! A trainer's checkpoints: saving in the background, waiting for them to land, and
//! resuming from the one the coordinator names or the newest that verifies (falling back
//! to the one before when a checkpoint's bytes are damaged).

use std::time::Instant;

use scfm_common::checkpoint::{
    json_diff, select_verified, select_verified_below, step_of, verify_dir,
};
use scfm_common::config::without_read_out;
use scfm_common::metrics_log::{self, Record};
use scfm_common::storage::Store;

use super::Trainer;
use crate::checkpoint::{self, TrainState};
use crate::error::{Result, WorkerError};
use crate::upload::AfterUpload;

/// `(validation loss, step)` of the best evaluation up to `upto` that was checkpointed,
/// from the run's metrics log (unreadable: none, the best is then found anew).
async fn best_checkpointed(store: &Store, upto: u64) -> Option<(f64, u64)> {
    let lines = metrics_log::read_effective(store).await.ok()??;
    lines
        .iter()
        .filter(|v| v["event"] == "eval" && v["checkpointed"] == true)
        .filter_map(|v| Some((v["val_loss"].as_f64()?, v["step"].as_u64()?)))
        .filter(|&(_, s)| s <= upto)
        .min_by(|a, b| a.0.total_cmp(&b.0))
}

impl Trainer {
    /// Restores the checkpoint in `dir` (chosen by the coordinator), or else the newest
    /// one that verifies, and says so.
    pub(super) fn resume(&mut self, dir: Option<&str>) -> Result<()> {
        let url = self.load_checkpoint(dir)?;
        eprintln!("resumed from {url} at step {}", self.state.step);
        Ok(())
    }

    /// Restores the checkpoint in `dir`, or else the newest one that verifies and loads;
    /// returns its URL.
    ///
    /// Parts are streamed into the tensors and their hashes known only at the end, so a
    /// part of the right size with other bytes fails the load after some values were
    /// written; without `dir`, the checkpoint before it is then loaded, overwriting every
    /// value (the first error is returned when none loads).
    pub(super) fn load_checkpoint(&mut self, dir: Option<&str>) -> Result<String> {
        let mut verified = match dir {
            Some(d) => self.rt.block_on(verify_dir(&self.store, d, None))?,
            None => self
                .rt
                .block_on(select_verified(&self.store))?
                .ok_or_else(|| WorkerError::Checkpoint {
                    url: self.store.url_of("latest.json"),
                    message: "--resume given but there is no checkpoint".into(),
                })?,
        };
        let mut first_error: Option<WorkerError> = None;
        let state = loop {
            let stored = checkpoint::state_of(&self.store, &verified)?;
            // Only what is trained must match: the read-out settings may change (and
            // checkpoints of older versions still list them in their settings).
            let diff = json_diff(
                "",
                &without_read_out(&stored.settings),
                &self.state.settings,
            );
            if !diff.is_empty() {
                return Err(WorkerError::Checkpoint {
                    url: self.store.url_of(&verified.dir),
                    message: format!(
                        "was written with other settings ({}); start over with --fresh or use another checkpoint URL",
                        diff.join(", ")
                    ),
                });
            }
            self.wait_snapshot();
            let loaded = self.rt.block_on(checkpoint::load_into(
                &self.store,
                &verified,
                &self.params,
                &mut self.opt,
            ));
            match loaded {
                Ok(state) => break state,
                Err(e) if dir.is_none() && is_damaged_checkpoint(&e) => {
                    tracing::warn!(checkpoint = %self.store.url_of(&verified.dir), error = %e, "the checkpoint failed verification while it loaded; trying the one before it");
                    let below = step_of(&verified.dir).unwrap_or(0);
                    let before = self.rt.block_on(select_verified_below(&self.store, below));
                    let first = first_error.take().unwrap_or(e);
                    match before {
                        Ok(Some(v)) => {
                            verified = v;
                            first_error = Some(first);
                        }
                        _ => return Err(first),
                    }
                }
                Err(e) => return Err(e),
            }
        };
        // The run goes on under this manifest's settings: the checkpoints it writes carry
        // its read-out settings and digest.
        self.state = TrainState {
            config_digest: self.state.config_digest.clone(),
            model: self.state.model.clone(),
            settings: self.state.settings.clone(),
            ..state
        };
        let dir = verified.dir.clone();
        self.uploader.set_current(Some(self.store.url_of(&dir)));
        if self.log.is_some() {
            self.best = self
                .rt
                .block_on(best_checkpointed(&self.store, self.state.step));
        }
        tracing::debug!(step = self.state.step, epoch = self.state.epoch, position = self.state.position, dir = %dir, "checkpoint loaded");
        Ok(self.store.url_of(&dir))
    }

    /// Saves a checkpoint: the tensors are copied here, the upload (then metrics and
    /// retention) runs in the background while training goes on. Only rank 0 writes (one
    /// writer of `latest.json`); the others return the key. A failed upload is logged
    /// (`latest.json` still names the checkpoint before it) and tried again in the
    /// background until it lands or a newer checkpoint supersedes it, while training goes
    /// on; [`Trainer::flush_checkpoint`] waits for the newest one to land.
    pub fn save(&mut self) -> Result<String> {
        let dir = checkpoint::dir_for(self.state.step);
        if self.ctx.collective.rank() != 0 {
            return Ok(dir);
        }
        let t = Instant::now();
        let snap = checkpoint::Snapshot::of(&self.params, &self.opt, &self.state)
            .with_vocab(Some(self.vocab_tsv.clone()));
        // A single process writes its own metrics; in a cluster the coordinator does.
        let after = AfterUpload {
            metrics: self.log.clone(),
            keep_last: self.spec.checkpoint.keep_last,
            keep_also: self.best_dir(),
            fence: self.ctx.fence.clone(),
        };
        self.uploader.start(self.store.clone(), snap, after);
        let stall = t.elapsed().as_secs_f64();
        tracing::debug!(
            step = self.state.step,
            stall_s = stall,
            "checkpoint handed to the uploader"
        );
        self.log_record(&Record::Checkpoint {
            step: self.state.step,
            stall_s: stall,
        });
        Ok(dir)
    }

    /// Waits until the checkpoint snapshot in flight is encoded, before anything changes
    /// the parameters or moments; a wait (encoding slower than a forward + backward) is
    /// recorded as a `checkpoint_wait` event.
    pub(crate) fn wait_snapshot(&mut self) {
        let waited = self.uploader.wait_snapshot();
        if waited > 0.001 {
            tracing::debug!(
                step = self.state.step,
                wait_s = waited,
                "waited for a checkpoint snapshot"
            );
            self.log_record(&Record::CheckpointWait {
                step: self.state.step,
                wait_s: waited,
            });
        }
    }

    /// Waits until the newest checkpoint has landed (retrying it), for at most the
    /// checkpoint grace, then writes what is left of the metrics log; either failing is an
    /// error.
    pub fn flush_checkpoint(&mut self) -> Result<()> {
        self.uploader.flush()?;
        if let Some(log) = &self.log {
            self.rt.block_on(log.flush())?;
        }
        Ok(())
    }

    /// How long the end of a run (or a preemption) waits for its last checkpoint to land
    /// (by default the store's retry window).
    pub fn set_checkpoint_grace(&mut self, grace: std::time::Duration) {
        self.uploader.set_grace(grace);
    }

    /// The best checkpoint's directory, kept by retention as well.
    fn best_dir(&self) -> Option<String> {
        self.best.map(|(_, step)| checkpoint::dir_for(step))
    }
}

/// Whether a failed load says the checkpoint's bytes are damaged (a part whose content or
/// hash is wrong), as opposed to the store failing: only damage makes a resume fall back
/// to an older checkpoint (a store outage would fail there too, after its retries).
fn is_damaged_checkpoint(e: &WorkerError) -> bool {
    matches!(
        e,
        WorkerError::Checkpoint { .. } | WorkerError::Common(scfm_common::Error::Corrupt { .. })
    )
}
