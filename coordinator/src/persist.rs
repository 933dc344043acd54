//! Coordinator state that must survive a coordinator restart, kept next to the
//! checkpoints as `coordinator.json` while a generation runs: the run id, the generation,
//! its members (ids and ring addresses) and its assignment. A coordinator started on a
//! run that has this file adopts the running workers (they reconnect with the same ids)
//! instead of forming a new generation. The file is removed when the job ends.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use scfm_common::rpc::Assignment;
use scfm_common::storage::Store;
use serde::{Deserialize, Serialize};

use crate::error::CoordinatorError;
use crate::state::{JobState, Phase, Worker};

/// The key of the persisted state under the checkpoint URL.
pub const KEY: &str = "coordinator.json";

/// One member of the running generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Worker id.
    pub id: String,
    /// Ring address.
    pub ring_addr: SocketAddr,
    /// Host name.
    pub hostname: String,
    /// Device.
    pub device: String,
}

/// `coordinator.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// Run id.
    pub run_id: String,
    /// Generation.
    pub generation: u64,
    /// Members by rank.
    pub members: Vec<Member>,
    /// Step the generation started from.
    pub step: u64,
    /// Data cursor (epoch) the generation started from.
    pub epoch: u64,
    /// Data cursor (position) the generation started from.
    pub position: u64,
    /// Checkpoint the generation resumed from.
    pub resume_dir: Option<String>,
    /// Next worker id counter.
    pub next_id: u64,
}

impl Persisted {
    /// The persisted view of a running job, or `None` when no generation runs.
    pub fn of(s: &JobState, run_id: &str) -> Option<Persisted> {
        let base = s.base.as_ref()?;
        if s.phase != Phase::Running {
            return None;
        }
        Some(Persisted {
            run_id: run_id.to_string(),
            generation: s.generation,
            members: s
                .members
                .iter()
                .filter_map(|id| {
                    let w = s.workers.get(id)?;
                    Some(Member {
                        id: id.clone(),
                        ring_addr: w.ring_addr,
                        hostname: w.hostname.clone(),
                        device: w.device.clone(),
                    })
                })
                .collect(),
            step: base.step,
            epoch: base.epoch,
            position: base.position,
            resume_dir: base.resume_dir.clone(),
            next_id: s.next_id(),
        })
    }

    /// Rebuilds the running job: the members count as just seen, so each has the worker
    /// timeout to reconnect.
    pub fn restore(&self, s: &mut JobState) {
        let now = Instant::now();
        for m in &self.members {
            s.workers.insert(
                m.id.clone(),
                Worker {
                    step: self.step,
                    adopted: true,
                    ..Worker::new(m.ring_addr, m.hostname.clone(), m.device.clone(), 0)
                },
            );
        }
        s.members = self.members.iter().map(|m| m.id.clone()).collect();
        s.generation = self.generation;
        s.base = Some(Assignment {
            generation: self.generation,
            rank: 0,
            world_size: self.members.len(),
            peers: self.members.iter().map(|m| m.ring_addr).collect(),
            step: self.step,
            epoch: self.epoch,
            position: self.position,
            finished: false,
            resume_dir: self.resume_dir.clone(),
            hold: false,
        });
        s.phase = Phase::Running;
        s.set_next_id(self.next_id);
        s.first_join = Some(now);
    }
}

/// Reads `coordinator.json`, if any.
pub async fn load(store: &Store) -> Result<Option<Persisted>, CoordinatorError> {
    match store.get_opt(KEY).await? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            CoordinatorError::Checkpoint(format!("{}: malformed: {e}", store.url_of(KEY)))
        }),
    }
}

/// Writes `coordinator.json`.
pub async fn save(store: &Store, p: &Persisted) -> Result<(), CoordinatorError> {
    let bytes = serde_json::to_vec_pretty(p).expect("persisted state serializes");
    store.put(KEY, Bytes::from(bytes)).await?;
    Ok(())
}

/// Removes `coordinator.json` (the job ended).
pub async fn clear(store: &Store) -> Result<(), CoordinatorError> {
    store.delete(KEY).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Refusal;
    use scfm_common::checkpoint::ResumePoint;
    use std::time::Duration;

    #[tokio::test]
    async fn a_running_generation_survives_a_restart() {
        let mut s = JobState::new(1, 2, Duration::from_secs(60), Duration::from_secs(30));
        let a = s
            .register(
                "127.0.0.1:7001".parse().unwrap(),
                "h".into(),
                "cpu".into(),
                1,
            )
            .unwrap();
        let b = s
            .register(
                "127.0.0.1:7002".parse().unwrap(),
                "h".into(),
                "cpu".into(),
                1,
            )
            .unwrap();
        assert!(Persisted::of(&s, "r").is_none());
        let at = ResumePoint {
            step: 4,
            epoch: 0,
            position: 64,
            dir: Some("ckpt-000000004".into()),
        };
        assert!(s.maybe_start(Instant::now(), &at));
        let p = Persisted::of(&s, "r").unwrap();
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().to_str().unwrap()).unwrap();
        save(&store, &p).await.unwrap();
        let back = load(&store).await.unwrap().unwrap();
        assert_eq!(back, p);
        let mut t = JobState::new(1, 2, Duration::from_secs(60), Duration::from_secs(30));
        back.restore(&mut t);
        assert_eq!(t.phase, Phase::Running);
        assert_eq!(t.assignment_for(&b), s.assignment_for(&b));
        // While an adopted worker has not been heard from, a newcomer is told to ask
        // again (its place may free up); once both answered, the cluster is plainly full.
        let ring: std::net::SocketAddr = "127.0.0.1:7003".parse().unwrap();
        let again = |t: &mut JobState| t.register(ring, "h".into(), "cpu".into(), 2);
        assert_eq!(again(&mut t), Err(Refusal::FullOfAdopted(2, 2)));
        assert!(t.heartbeat(&a, 9, Instant::now()));
        assert_eq!(again(&mut t), Err(Refusal::FullOfAdopted(2, 1)));
        assert!(t.heartbeat(&b, 9, Instant::now()));
        assert_eq!(again(&mut t), Err(Refusal::Full(2)));
        // New ids do not collide with the adopted ones.
        assert_eq!(t.next_id(), s.next_id());
        clear(&store).await.unwrap();
        assert!(load(&store).await.unwrap().is_none());
    }
}
