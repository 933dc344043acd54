//! Job state: membership, generations, the run cursor, completion.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use scfm_common::checkpoint::ResumePoint;
use scfm_common::rpc::Assignment;

/// Where the job is.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Waiting for workers to join.
    Joining,
    /// Training with the current generation.
    Running,
    /// Every worker reported success.
    Done,
    /// The job failed; the message says why.
    Failed(String),
}

/// One registered worker.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Ring address.
    pub ring_addr: SocketAddr,
    /// Host name it reported.
    pub hostname: String,
    /// Device it reported.
    pub device: String,
    /// Last heartbeat (or registration).
    pub last_seen: Instant,
    /// Last step it reported.
    pub step: u64,
    /// Whether it reported completion.
    pub done: bool,
    /// Process id it reported (`scfm local` maps exited children to workers by it).
    pub pid: u32,
    /// It asked for a generation newer than the current one: it is not (or no longer)
    /// training in the current generation and is ready for the next.
    pub waiting: bool,
    /// Taken over from a previous coordinator's `coordinator.json` and not heard from
    /// since: it may be dead (then it is dropped after the worker timeout).
    pub adopted: bool,
}

impl Worker {
    /// A worker seen just now.
    pub fn new(ring_addr: SocketAddr, hostname: String, device: String, pid: u32) -> Self {
        Worker {
            ring_addr,
            hostname,
            device,
            last_seen: Instant::now(),
            step: 0,
            done: false,
            pid,
            waiting: false,
            adopted: false,
        }
    }
}

/// A pending change of membership: the next generation forms once every live worker is
/// ready for it.
#[derive(Debug, Clone)]
pub struct Reform {
    /// Why (a worker was lost, left its generation, or joined).
    pub reason: String,
    /// Whether a member was lost or left (the generation is dead: abort it) rather than a
    /// worker joining (stop at a step boundary).
    pub lost: bool,
    /// When the change was noticed.
    pub since: Instant,
}

/// The coordinator's view of the job.
#[derive(Debug)]
pub struct JobState {
    /// Workers by id, in registration order (ids are zero-padded counters).
    pub workers: BTreeMap<String, Worker>,
    /// Current phase.
    pub phase: Phase,
    /// Current generation (0 = none formed yet).
    pub generation: u64,
    /// Member ids of the current generation, by rank.
    pub members: Vec<String>,
    /// Assignment of the current generation (rank 0's; ranks differ only in `rank`).
    pub base: Option<Assignment>,
    /// Minimum and maximum cluster size.
    pub min_workers: usize,
    /// Maximum cluster size.
    pub max_workers: usize,
    /// When the first worker joined.
    pub first_join: Option<Instant>,
    /// When the coordinator started waiting for workers.
    pub created: Instant,
    /// How long to wait for `max_workers`.
    pub join_timeout: Duration,
    /// Silence after which a worker is dead.
    pub worker_timeout: Duration,
    /// When a preemption was requested (workers checkpoint at the next step and stop).
    pub preempt_at: Option<Instant>,
    /// Whether the job ended on a preemption (every worker checkpointed and stopped).
    pub preempted: bool,
    /// A membership change waiting for the next generation.
    pub reform: Option<Reform>,
    /// Whether the current generation only holds the state (fewer than `min_workers`).
    pub holding: bool,
    /// Since when the job has had fewer than `min_workers` (it fails after `join_timeout`).
    pub short_since: Option<Instant>,
    /// When the last generation formed after a membership change, and why (for logs and
    /// the recovery-time figure).
    pub last_reform: Option<(Instant, Duration)>,
    /// NCCL's unique id, by the generation whose rank 0 published it (`nccl_id.rs`).
    pub nccl_id: Option<(u64, Vec<u8>)>,
    next_id: u64,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The cluster is full.
    Full(usize),
    /// The cluster is full, but this many of its places are held by workers of a previous
    /// coordinator that have not reconnected (they are dropped after the worker timeout,
    /// so asking again later may succeed).
    FullOfAdopted(usize, usize),
    /// The job is over.
    Over,
}

impl JobState {
    /// A job waiting for between `min` and `max` workers.
    pub fn new(min: usize, max: usize, join_timeout: Duration, worker_timeout: Duration) -> Self {
        JobState {
            workers: BTreeMap::new(),
            phase: Phase::Joining,
            generation: 0,
            members: Vec::new(),
            base: None,
            min_workers: min,
            max_workers: max,
            first_join: None,
            created: Instant::now(),
            join_timeout,
            worker_timeout,
            preempt_at: None,
            preempted: false,
            reform: None,
            holding: false,
            short_since: None,
            last_reform: None,
            nccl_id: None,
            next_id: 0,
        }
    }

    /// The next worker id counter (persisted across coordinator restarts).
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Sets the next worker id counter (when adopting a running job).
    pub fn set_next_id(&mut self, n: u64) {
        self.next_id = n;
    }

    /// Registers a worker; returns its id. While training, a worker joins at the next
    /// generation once it is ready (it asks for an assignment after loading its data, so
    /// the running generation is not held up meanwhile).
    pub fn register(
        &mut self,
        ring_addr: SocketAddr,
        hostname: String,
        device: String,
        pid: u32,
    ) -> Result<String, Refusal> {
        if self.is_over() {
            return Err(Refusal::Over);
        }
        if self.workers.len() >= self.max_workers {
            let adopted = self.workers.values().filter(|w| w.adopted).count();
            if adopted > 0 {
                return Err(Refusal::FullOfAdopted(self.max_workers, adopted));
            }
            return Err(Refusal::Full(self.max_workers));
        }
        let id = format!("w{:04}", self.next_id);
        self.next_id += 1;
        self.workers
            .insert(id.clone(), Worker::new(ring_addr, hostname, device, pid));
        self.first_join.get_or_insert_with(Instant::now);
        Ok(id)
    }

    /// Forms the first generation when enough workers joined; returns true if it did.
    pub fn maybe_start(&mut self, now: Instant, resume: &ResumePoint) -> bool {
        if self.phase != Phase::Joining || self.workers.is_empty() {
            return false;
        }
        let n = self.workers.len();
        let waited = self
            .first_join
            .is_some_and(|t| now.duration_since(t) >= self.join_timeout);
        if n >= self.max_workers || (n >= self.min_workers && waited) {
            self.members = self.workers.keys().cloned().collect();
            self.generation += 1;
            self.base = Some(Assignment {
                generation: self.generation,
                rank: 0,
                world_size: n,
                peers: self
                    .members
                    .iter()
                    .map(|id| self.workers[id].ring_addr)
                    .collect(),
                step: resume.step,
                epoch: resume.epoch,
                position: resume.position,
                finished: false,
                resume_dir: resume.dir.clone(),
                hold: false,
            });
            self.phase = Phase::Running;
            return true;
        }
        false
    }

    /// The assignment of worker `id` in the current generation, if it is a member.
    pub fn assignment_for(&self, id: &str) -> Option<Assignment> {
        let rank = self.members.iter().position(|m| m == id)?;
        let mut a = self.base.clone()?;
        a.rank = rank;
        a.finished = matches!(self.phase, Phase::Done);
        Some(a)
    }

    /// Why the job must fail for lack of workers: fewer than `min_workers` joined within
    /// `join_timeout` of the coordinator starting.
    pub fn join_expired(&self, now: Instant) -> Option<String> {
        (self.phase == Phase::Joining
            && self.workers.len() < self.min_workers
            && now.duration_since(self.created) > self.join_timeout)
            .then(|| {
                format!(
                    "only {} of the {} required workers joined within {} s",
                    self.workers.len(),
                    self.min_workers,
                    self.join_timeout.as_secs()
                )
            })
    }

    /// Records a heartbeat; false when the worker is unknown.
    pub fn heartbeat(&mut self, id: &str, step: u64, now: Instant) -> bool {
        match self.workers.get_mut(id) {
            Some(w) => {
                w.last_seen = now;
                w.step = w.step.max(step);
                w.adopted = false;
                true
            }
            None => false,
        }
    }

    /// Workers silent for longer than the timeout.
    pub fn dead_workers(&self, now: Instant) -> Vec<String> {
        self.workers
            .iter()
            .filter(|(_, w)| !w.done && now.duration_since(w.last_seen) > self.worker_timeout)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Fails the job (first failure wins).
    pub fn fail(&mut self, why: String) {
        if !matches!(self.phase, Phase::Done | Phase::Failed(_)) {
            self.phase = Phase::Failed(why);
        }
    }

    /// Records a worker's completion; the job is done when every member is.
    pub fn done(&mut self, id: &str) {
        if let Some(w) = self.workers.get_mut(id) {
            w.done = true;
        }
        if self.phase == Phase::Running
            && self.reform.is_none()
            && !self.holding
            && self
                .members
                .iter()
                .all(|m| self.workers.get(m).is_some_and(|w| w.done))
        {
            self.phase = Phase::Done;
        }
    }

    /// Whether the job has ended (successfully or not).
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn forms_generation_at_max_and_assigns_ranks() {
        let mut s = JobState::new(1, 2, Duration::from_secs(60), Duration::from_secs(30));
        let a = s.register(addr(1), "h".into(), "cpu".into(), 1).unwrap();
        assert!(!s.maybe_start(Instant::now(), &ResumePoint::default()));
        let b = s.register(addr(2), "h".into(), "cpu".into(), 2).unwrap();
        assert_eq!(
            s.register(addr(3), "h".into(), "cpu".into(), 3),
            Err(Refusal::Full(2))
        );
        let at = ResumePoint {
            step: 5,
            epoch: 1,
            position: 64,
            dir: Some("ckpt-000000005".into()),
        };
        assert!(s.maybe_start(Instant::now(), &at));
        let (aa, ab) = (s.assignment_for(&a).unwrap(), s.assignment_for(&b).unwrap());
        assert_eq!(
            (aa.rank, ab.rank, aa.world_size, aa.generation, aa.step),
            (0, 1, 2, 1, 5)
        );
        assert_eq!(aa.peers, vec![addr(1), addr(2)]);
        assert_eq!(ab.resume_dir.as_deref(), Some("ckpt-000000005"));
        assert_eq!(
            s.register(addr(4), "h".into(), "cpu".into(), 4),
            Err(Refusal::Full(2))
        );
        s.done(&a);
        assert_eq!(s.phase, Phase::Running);
        s.done(&b);
        assert_eq!(s.phase, Phase::Done);
    }

    #[test]
    fn starts_with_min_after_join_timeout_and_detects_silence() {
        let mut s = JobState::new(1, 3, Duration::from_millis(10), Duration::from_millis(20));
        let a = s.register(addr(1), "h".into(), "cpu".into(), 1).unwrap();
        let later = Instant::now() + Duration::from_millis(50);
        assert!(s.maybe_start(later, &ResumePoint::default()));
        assert_eq!(s.assignment_for(&a).unwrap().world_size, 1);
        assert_eq!(s.dead_workers(later), vec![a.clone()]);
        s.heartbeat(&a, 3, later);
        assert!(s.dead_workers(later).is_empty());
        let mut lonely = JobState::new(2, 2, Duration::from_millis(10), Duration::from_secs(1));
        lonely
            .register(addr(9), "h".into(), "cpu".into(), 9)
            .unwrap();
        assert_eq!(lonely.join_expired(Instant::now()), None);
        assert_eq!(
            lonely.join_expired(later).as_deref(),
            Some("only 1 of the 2 required workers joined within 0 s")
        );
        s.fail("x".into());
        s.fail("y".into());
        assert_eq!(s.phase, Phase::Failed("x".into()));
    }
}
