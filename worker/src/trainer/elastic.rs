//! A trainer moving between generations of an elastic cluster: it takes the new
//! generation's collective, agrees with the other members on the state to continue from,
//! and recomputes the schedule for the new world size.
//!
//! The state agreed on: among the members that trained in the newest earlier generation
//! (survivors), the one with the *lowest* step — the last step every survivor completed
//! (a survivor may have finished one more step before its ring broke; that step is
//! undone, and the coordinator drops its metrics). Without survivors (every member is
//! new), the members loaded the newest verified checkpoint (or nothing) and the one with
//! the highest step wins. That member broadcasts parameters, AdamW moments and the
//! training state (step, data cursor, early-stopping state) to the others. The data cursor
//! is global, so the remaining cells of the epoch are re-split over the new world by the
//! loader with no cell repeated or skipped.

use scfm_common::checkpoint::select_verified;

use super::{Trainer, WorkerContext};
use crate::checkpoint::TrainState;
use crate::error::{Result, WorkerError};
use crate::step::with_host_slice;

/// The member whose state a new generation continues from, given every member's
/// `(generation whose state it holds live, 0 when none; step)`.
pub fn sync_root(members: &[(u64, u64)]) -> usize {
    let newest = members.iter().map(|m| m.0).max().unwrap_or(0);
    let pick = |r: usize| {
        let (g, s) = members[r];
        if newest > 0 {
            // Survivors of the newest generation: the lowest step (then the lowest rank).
            (g != newest, s, r)
        } else {
            // Checkpoint-loaded or fresh members: the highest step.
            (false, u64::MAX - s, r)
        }
    };
    (0..members.len()).min_by_key(|&r| pick(r)).unwrap_or(0)
}

impl Trainer {
    /// Switches to the collective of a new generation (the old one is dropped first, so
    /// its sockets close and peers still blocked on it fail fast); the run's length is
    /// planned for its world size.
    pub fn set_context(&mut self, ctx: WorkerContext) {
        self.ctx = ctx;
        if self.ctx.collective.world_size() > 1 {
            if self.ctx.overlap && crate::overlap::supported(&self.params.grad) {
                let sizes: Vec<usize> = (0..self.buckets.len())
                    .map(|s| self.buckets.numel(s))
                    .collect();
                tracing::info!(
                    generation = self.ctx.generation,
                    "gradient all-reduce overlapped with the backward pass: buckets of {sizes:?} \
                     parameters, in backward order"
                );
            } else {
                tracing::info!(
                    generation = self.ctx.generation,
                    "gradient all-reduce after the backward pass (one flat buffer)"
                );
            }
        }
        self.total_steps = self.plan_total_steps();
    }

    /// Restores the checkpoint in `dir` (verified first).
    pub fn resume_from(&mut self, dir: &str) -> Result<()> {
        self.resume(Some(dir))?;
        self.total_steps = self.plan_total_steps();
        self.tainted = false;
        Ok(())
    }

    /// This worker's rank in the current generation.
    pub fn rank(&self) -> usize {
        self.ctx.collective.rank()
    }

    /// Drops the collective of a generation that failed (closing its sockets).
    pub fn drop_collective(&mut self) {
        self.ctx.collective = Box::new(crate::collective::LocalCollective::new());
    }

    /// Whether a state synchronisation failed half-way (reload a checkpoint before
    /// offering this state to anyone).
    pub fn is_tainted(&self) -> bool {
        self.tainted
    }

    /// Loads the newest verified checkpoint when there is one (a worker joining an
    /// elastic cluster with no state of its own); returns whether it did. This is only a
    /// fallback: the generation continues from the state its members agree on
    /// ([`Trainer::sync_state`]), a survivor's when there is one, and that is what is
    /// logged.
    pub fn resume_latest_if_any(&mut self) -> Result<bool> {
        if self.rt.block_on(select_verified(&self.store))?.is_none() {
            return Ok(false);
        }
        let url = self.load_checkpoint(None)?;
        tracing::info!(
            checkpoint = %url,
            step = self.state.step,
            "loaded the newest checkpoint (used only when no member of the generation has a newer state)"
        );
        self.total_steps = self.plan_total_steps();
        self.tainted = false;
        Ok(true)
    }

    /// Agrees with the other members of the new generation on the state to continue from
    /// (see the module documentation); `live_generation` is the generation whose state this
    /// trainer holds from training (0: none, or only a checkpoint). Returns the step the
    /// generation continues from.
    pub fn sync_state(&mut self, live_generation: u64) -> Result<u64> {
        let coll = self.ctx.collective.as_mut();
        let (rank, world) = (coll.rank(), coll.world_size());
        let mine = self.state.step;
        let mut info = vec![0f64; 2 * world];
        info[2 * rank] = live_generation as f64;
        info[2 * rank + 1] = mine as f64;
        coll.all_reduce_sum_f64(&mut info)?;
        let members: Vec<(u64, u64)> = info.chunks(2).map(|c| (c[0] as u64, c[1] as u64)).collect();
        let root = sync_root(&members);
        self.wait_snapshot();
        let coll = self.ctx.collective.as_mut();
        // Until the whole state arrived, a failure leaves a mix of ours and the root's.
        self.tainted = rank != root;
        for t in [&self.params.flat, &self.opt.exp_avg, &self.opt.exp_avg_sq] {
            with_host_slice(t, |s| coll.broadcast(s, root))??;
        }
        let mut bytes = if rank == root {
            serde_json::to_vec(&(&self.state, self.opt.step))
                .map_err(|e| WorkerError::Internal(format!("state does not serialize: {e}")))?
        } else {
            Vec::new()
        };
        coll.broadcast_bytes(&mut bytes, root)?;
        let (state, opt_step): (TrainState, u64) = serde_json::from_slice(&bytes)
            .map_err(|e| WorkerError::Internal(format!("state from rank {root}: {e}")))?;
        if state.config_digest != self.state.config_digest {
            return Err(WorkerError::Internal(format!(
                "rank {root} trains with other settings (digest {} vs {})",
                state.config_digest, self.state.config_digest
            )));
        }
        self.state = state;
        self.opt.step = opt_step;
        self.tainted = false;
        self.total_steps = self.plan_total_steps();
        let step = self.state.step;
        // Said whenever this worker's state was replaced by another (a joiner, or a
        // member a step ahead); survivors already holding the same state stay quiet.
        if rank != root && (members[rank].0 != members[root].0 || step != mine) {
            let (g, _) = members[root];
            let whose = if g > 0 {
                format!("a survivor of generation {g}")
            } else {
                "loaded from the newest checkpoint".to_string()
            };
            eprintln!("took the state of rank {root} ({whose}) at step {step}");
        }
        if step != mine {
            tracing::warn!(
                from = mine,
                to = step,
                root,
                "state taken from rank {root}: continuing at step {step}"
            );
        }
        tracing::info!(
            generation = self.ctx.generation,
            rank,
            world,
            step,
            epoch = self.state.epoch,
            position = self.state.position,
            total_steps = self.total_steps,
            "generation state agreed"
        );
        Ok(step)
    }

    /// Steps of the whole run: `max_steps`, else the steps done plus those the remaining
    /// cells of `epochs` need at the current world size (epochs are one stream of cells;
    /// the last step may reach into the next epoch). Equal to
    /// `ceil(epochs * n_train / cells_per_step)` when the world size never changed.
    pub(super) fn plan_total_steps(&self) -> u64 {
        let t = &self.spec.training;
        if let Some(m) = t.max_steps {
            return m;
        }
        let per_step = super::loader_config(&self.spec, &self.ctx).cells_per_step() as u64;
        let n_train = self.order.n_train() as u64;
        let want = n_train * t.epochs as u64;
        let done = self.state.epoch * n_train + self.state.position as u64;
        self.state.step + want.saturating_sub(done).div_ceil(per_step.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::sync_root;

    #[test]
    fn survivors_continue_from_the_last_step_all_completed() {
        // Rank 1 finished one more step before the ring broke; rank 2 is new.
        assert_eq!(sync_root(&[(3, 41), (3, 42), (0, 0)]), 0);
        assert_eq!(sync_root(&[(0, 0), (3, 42), (3, 41)]), 2);
        // A stale survivor of an older generation does not win.
        assert_eq!(sync_root(&[(2, 10), (3, 42)]), 1);
        // Nobody trained: the newest checkpoint any member loaded.
        assert_eq!(sync_root(&[(0, 0), (0, 300), (0, 300)]), 1);
        assert_eq!(sync_root(&[(0, 0)]), 0);
    }
}
