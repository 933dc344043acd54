//! Elastic membership: workers that are lost (silent, exited, or out of their ring) or
//! that join while training make the coordinator form the next generation once every
//! live worker is ready for it (it left the old generation and asks for a new one).
//!
//! The workers of the new generation agree among themselves on the state to continue
//! from (the last step every survivor completed; see the worker's `sync_state`), so the
//! coordinator only decides who is in it. With fewer than `min_workers` the generation
//! *holds*: its members agree on the state, checkpoint it and wait for workers to
//! return; the job fails when that lasts longer than `join_timeout`.

use std::time::{Duration, Instant};

use scfm_common::rpc::Assignment;

use crate::state::{JobState, Phase, Reform};

impl JobState {
    /// Asks for a new generation (the first reason is kept until it forms); `lost`: a
    /// member is gone, so the current generation is dead.
    pub fn request_reform(&mut self, reason: String, lost: bool) {
        if self.phase != Phase::Running {
            return;
        }
        match &mut self.reform {
            None => {
                tracing::warn!(generation = self.generation, %reason, "membership changes: forming a new generation");
                self.reform = Some(Reform {
                    reason,
                    lost,
                    since: Instant::now(),
                });
            }
            Some(r) => r.lost |= lost,
        }
    }

    /// Worker `id` asks for a generation newer than the current one: it is ready for the
    /// next. A member of a training generation asking means it left it (its ring failed or
    /// it stopped on the coordinator's order), which makes a new generation necessary.
    pub fn wants_next(&mut self, id: &str) {
        if self.phase != Phase::Running {
            return;
        }
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        if w.waiting {
            return;
        }
        w.waiting = true;
        let member = self.members.iter().any(|m| m == id);
        if !member {
            self.request_reform(format!("worker {id} joined"), false);
        } else if !self.holding {
            self.request_reform(
                format!("worker {id} left generation {}", self.generation),
                true,
            );
        }
    }

    /// Whether worker `id` must abandon its generation (`generation`) at once: a member of
    /// it was lost, so its collectives cannot complete.
    pub fn must_abort(&self, id: &str, generation: u64) -> bool {
        self.must_reform(id, generation) && self.reform.as_ref().is_some_and(|r| r.lost)
    }

    /// Whether worker `id` must leave its generation (`generation`) for the next one.
    pub fn must_reform(&self, id: &str, generation: u64) -> bool {
        self.reform.is_some()
            && generation == self.generation
            && !self.holding
            && self.members.iter().any(|m| m == id)
    }

    /// Removes a dead worker (silent too long, or its process exited); a member's loss
    /// calls for a new generation.
    pub fn lose(&mut self, id: &str, why: &str) {
        let Some(w) = self.workers.remove(id) else {
            return;
        };
        tracing::warn!(worker = %id, ring = %w.ring_addr, host = %w.hostname, pid = w.pid, "worker lost: {why}");
        if self.members.iter().any(|m| m == id) {
            self.request_reform(format!("worker {id} lost ({why})"), true);
        }
    }

    /// The worker whose process has this pid.
    pub fn worker_with_pid(&self, pid: u32) -> Option<String> {
        self.workers
            .iter()
            .find(|(_, w)| w.pid == pid)
            .map(|(id, _)| id.clone())
    }

    /// Forms the next generation when a change is pending and every live worker is ready;
    /// a worker that stays silent for `silence` meanwhile is lost. Returns true if formed.
    pub fn maybe_reform(&mut self, now: Instant, silence: Duration) -> bool {
        if self.phase != Phase::Running {
            return false;
        }
        let Some(reform) = self.reform.clone() else {
            return false;
        };
        let silent: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.waiting && now.duration_since(w.last_seen) > silence)
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            self.lose(&id, "silent during a membership change");
        }
        // Members still training in the old generation hold it up; workers that joined
        // but are not ready yet (still loading) are left for a later generation.
        if self
            .members
            .iter()
            .any(|m| self.workers.get(m).is_some_and(|w| !w.waiting))
        {
            return false;
        }
        // Survivors keep their order (rank 0 stays rank 0 when it survives), then joiners.
        let mut order: Vec<String> = self
            .members
            .iter()
            .filter(|m| self.workers.contains_key(*m))
            .cloned()
            .collect();
        for (id, w) in &self.workers {
            if w.waiting && !order.contains(id) {
                order.push(id.clone());
            }
        }
        self.reform = None;
        if order.is_empty() {
            self.members.clear();
            self.short_since.get_or_insert(now);
            tracing::warn!("no workers left: waiting for workers to join");
            return false;
        }
        let n = order.len();
        self.generation += 1;
        self.holding = n < self.min_workers;
        if self.holding {
            self.short_since.get_or_insert(now);
        } else {
            self.short_since = None;
        }
        let step = order
            .iter()
            .map(|id| self.workers[id].step)
            .max()
            .unwrap_or(0);
        self.base = Some(Assignment {
            generation: self.generation,
            rank: 0,
            world_size: n,
            peers: order.iter().map(|id| self.workers[id].ring_addr).collect(),
            step,
            epoch: 0,
            position: 0,
            finished: false,
            resume_dir: None,
            hold: self.holding,
        });
        self.members = order;
        for w in self.workers.values_mut() {
            w.waiting = false;
        }
        let took = now.duration_since(reform.since);
        self.last_reform = Some((now, took));
        if self.holding {
            tracing::warn!(
                generation = self.generation,
                workers = n,
                min_workers = self.min_workers,
                "fewer than min_workers remain: checkpointing and waiting for workers to join"
            );
        } else {
            tracing::warn!(generation = self.generation, workers = n, reason = %reform.reason, ready_after_s = took.as_secs_f64(), "new generation formed");
        }
        true
    }

    /// A preemption while no generation trains — a holding generation whose members all
    /// checkpointed and wait, or no members at all — ends the job as preempted at once
    /// (there is no step boundary to reach). Returns true if it did.
    pub fn preempt_while_idle(&mut self) -> bool {
        if self.phase != Phase::Running {
            return false;
        }
        let idle = self.members.is_empty()
            || (self.holding
                && self
                    .members
                    .iter()
                    .all(|m| self.workers.get(m).is_none_or(|w| w.waiting)));
        if idle {
            self.preempted = true;
            self.phase = Phase::Done;
        }
        idle
    }

    /// Why the job must fail: it has had fewer than `min_workers` for longer than
    /// `join_timeout`.
    pub fn short_expired(&self, now: Instant) -> Option<String> {
        let since = self.short_since?;
        (self.phase == Phase::Running && now.duration_since(since) > self.join_timeout).then(|| {
            format!(
                "fewer than min_workers ({}) workers for {} s (join_timeout_s); the latest checkpoint stays for a relaunch",
                self.min_workers,
                self.join_timeout.as_secs()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use scfm_common::checkpoint::ResumePoint;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn running(n: usize, min: usize, max: usize) -> (JobState, Vec<String>) {
        let mut s = JobState::new(min, max, Duration::from_secs(5), Duration::from_secs(30));
        let ids: Vec<String> = (0..n)
            .map(|i| {
                s.register(addr(i as u16 + 1), "h".into(), "cpu".into(), 100 + i as u32)
                    .unwrap()
            })
            .collect();
        let later = Instant::now() + Duration::from_secs(10);
        assert!(s.maybe_start(later, &ResumePoint::default()));
        (s, ids)
    }

    #[test]
    fn a_lost_worker_makes_the_survivors_form_the_next_generation() {
        let (mut s, ids) = running(3, 2, 3);
        let now = Instant::now();
        let quiet = Duration::from_secs(3);
        assert!(!s.maybe_reform(now, quiet));
        // Worker 1's process exits; the others' ring fails and they ask for more.
        s.lose(&ids[1], "process exited");
        assert!(s.reform.is_some());
        assert!(s.must_reform(&ids[0], 1) && s.must_abort(&ids[0], 1));
        assert!(!s.must_reform(&ids[0], 2));
        s.wants_next(&ids[0]);
        assert!(!s.maybe_reform(now, quiet), "worker 2 is still training");
        s.wants_next(&ids[2]);
        assert!(s.maybe_reform(now, quiet));
        let (a0, a2) = (
            s.assignment_for(&ids[0]).unwrap(),
            s.assignment_for(&ids[2]).unwrap(),
        );
        assert_eq!(
            (a0.generation, a0.rank, a2.rank, a0.world_size, a0.hold),
            (2, 0, 1, 2, false)
        );
        assert_eq!(a0.peers, vec![addr(1), addr(3)]);
        assert!(s.assignment_for(&ids[1]).is_none());
        assert!(s.reform.is_none() && s.last_reform.is_some());
        // Both finish: the job is done.
        s.done(&ids[0]);
        s.done(&ids[2]);
        assert_eq!(s.phase, Phase::Done);
    }

    #[test]
    fn a_silent_member_is_lost_during_a_membership_change() {
        let (mut s, ids) = running(2, 1, 2);
        s.wants_next(&ids[0]);
        let later = Instant::now() + Duration::from_secs(5);
        s.heartbeat(&ids[0], 7, later);
        assert!(s.maybe_reform(later, Duration::from_secs(3)));
        assert!(!s.workers.contains_key(&ids[1]));
        let a = s.assignment_for(&ids[0]).unwrap();
        assert_eq!((a.world_size, a.step, a.generation), (1, 7, 2));
    }

    #[test]
    fn a_joiner_enters_at_the_next_generation_after_the_members_stop() {
        let (mut s, ids) = running(2, 2, 3);
        let j = s
            .register(addr(9), "h".into(), "cpu".into(), 9)
            .expect("joining a running job");
        // Registered but still loading: the generation goes on.
        assert!(!s.must_reform(&ids[1], 1));
        assert!(!s.maybe_reform(Instant::now(), Duration::from_secs(3)));
        s.wants_next(&j);
        assert!(s.must_reform(&ids[1], 1) && !s.must_abort(&ids[1], 1));
        let now = Instant::now();
        assert!(!s.maybe_reform(now, Duration::from_secs(3)));
        s.wants_next(&ids[0]);
        s.wants_next(&ids[1]);
        assert!(s.maybe_reform(now, Duration::from_secs(3)));
        let aj = s.assignment_for(&j).unwrap();
        assert_eq!((aj.rank, aj.world_size, aj.generation), (2, 3, 2));
        assert_eq!(
            s.register(addr(10), "h".into(), "cpu".into(), 10),
            Err(crate::state::Refusal::Full(3))
        );
    }

    #[test]
    fn below_min_workers_the_generation_holds_until_workers_return_or_time_runs_out() {
        let (mut s, ids) = running(2, 2, 2);
        s.lose(&ids[1], "process exited");
        s.wants_next(&ids[0]);
        let now = Instant::now();
        assert!(s.maybe_reform(now, Duration::from_secs(3)));
        let a = s.assignment_for(&ids[0]).unwrap();
        assert!(a.hold && a.world_size == 1);
        // The holding member checkpoints and asks again: no new generation by itself.
        assert!(
            !s.preempt_while_idle(),
            "the holding member has not checkpointed yet"
        );
        s.wants_next(&ids[0]);
        assert!(!s.maybe_reform(now, Duration::from_secs(3)));
        assert_eq!(s.short_expired(now), None);
        // A worker returns: training goes on with two.
        let j = s.register(addr(5), "h".into(), "cpu".into(), 5).unwrap();
        assert!(!s.maybe_reform(now, Duration::from_secs(3)));
        s.wants_next(&j);
        assert!(s.maybe_reform(now, Duration::from_secs(3)));
        let a = s.assignment_for(&j).unwrap();
        assert!(!a.hold && a.world_size == 2 && a.generation == 3);
        assert!(s.short_since.is_none());
        // Lost again, and nobody comes back within the join timeout.
        s.lose(&j, "process exited");
        s.wants_next(&ids[0]);
        assert!(s.maybe_reform(now, Duration::from_secs(3)));
        let late = now + Duration::from_secs(6);
        assert!(s.short_expired(late).unwrap().contains("min_workers (2)"));
        // Preempted while holding, every member waiting: over at once.
        s.wants_next(&ids[0]);
        assert!(s.preempt_while_idle());
        assert!(s.phase == Phase::Done && s.preempted);
    }
}
