//! Fencing of a dropped generation's checkpoints.
//!
//! A network cut between the coordinator and its workers that lasts past
//! `worker_timeout_s` makes the coordinator drop the workers, while they may still reach
//! each other and the checkpoint store and train on, unaware. Once new workers join, two
//! generations would write checkpoints of the same steps under the same URL and prune each
//! other's. The coordinator keeps its running generation and its members in
//! `coordinator.json` next to the checkpoints, so before rank 0 writes a checkpoint (and
//! again before `latest.json` names it) it reads that file: when it names a newer
//! generation of the same run that this worker is not a member of, this worker was
//! dropped. The checkpoint is not committed (its parts are removed), and the worker's job
//! ends ([`Control::end`]): it leaves at the next step boundary and exits 3.
//!
//! A newer generation that this worker *is* a member of (it survived a re-formation while
//! the checkpoint was uploading) does not fence it: the checkpoint is of the same lineage.

use scfm_common::storage::Store;

use crate::control::Control;

/// The key of the coordinator's persisted state under the checkpoint URL (written by the
/// coordinator while a generation runs).
pub const COORDINATOR_KEY: &str = "coordinator.json";

/// Who writes a checkpoint: the run, this worker and the generation it trains in.
#[derive(Debug, Clone)]
pub struct Fence {
    /// The run id the coordinator assigned.
    pub run_id: String,
    /// This worker's id.
    pub worker_id: String,
    /// The generation the checkpoint was taken in.
    pub generation: u64,
    /// Ended when the fence finds this worker dropped.
    pub control: Control,
}

impl Fence {
    /// Why this worker may no longer write checkpoints (`Some(reason)`), after ending its
    /// job; `None` when it may. A missing or unreadable `coordinator.json`, or a store
    /// that cannot be read, does not fence (the coordinator may be restarting; a dead
    /// coordinator leaves the workers to train on, as designed).
    pub async fn check(&self, store: &Store) -> Option<String> {
        let bytes = match store.get_opt(COORDINATOR_KEY).await {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "could not read coordinator.json to check this worker is still a member; writing the checkpoint");
                return None;
            }
        };
        let reason = self.superseded_by(&bytes)?;
        tracing::error!(reason = %reason, "this worker was dropped: not writing the checkpoint; stopping");
        self.control.end(reason.clone());
        Some(reason)
    }

    /// The fencing rule on the bytes of `coordinator.json`.
    fn superseded_by(&self, bytes: &[u8]) -> Option<String> {
        let v: serde_json::Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "coordinator.json does not parse; not fencing on it");
                return None;
            }
        };
        if v["run_id"].as_str() != Some(self.run_id.as_str()) {
            return None;
        }
        let generation = v["generation"].as_u64()?;
        if generation <= self.generation {
            return None;
        }
        let member = v["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|x| x["id"].as_str() == Some(&self.worker_id)));
        (!member).then(|| {
            format!(
                "the coordinator formed generation {generation} without this worker ({}, generation {}): it was dropped, probably cut off from the coordinator",
                self.worker_id, self.generation
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(control: &Control) -> Fence {
        Fence {
            run_id: "run-a".into(),
            worker_id: "w1".into(),
            generation: 3,
            control: control.clone(),
        }
    }

    fn state(run: &str, generation: u64, members: &[&str]) -> Vec<u8> {
        let m: Vec<_> = members
            .iter()
            .map(|id| serde_json::json!({"id": id, "ring_addr": "127.0.0.1:1", "hostname": "h", "device": "cpu"}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "run_id": run, "generation": generation, "members": m,
            "step": 0, "epoch": 0, "position": 0, "resume_dir": null, "next_id": 9
        }))
        .unwrap()
    }

    #[test]
    fn only_a_newer_generation_of_the_run_without_this_worker_fences() {
        let c = Control::default();
        let f = fence(&c);
        assert!(f.superseded_by(&state("run-a", 4, &["w5", "w6"])).is_some());
        assert!(
            f.superseded_by(&state("run-a", 4, &["w1", "w5"])).is_none(),
            "a member"
        );
        assert!(
            f.superseded_by(&state("run-a", 3, &["w5"])).is_none(),
            "same generation"
        );
        assert!(f.superseded_by(&state("run-a", 2, &[])).is_none(), "older");
        assert!(
            f.superseded_by(&state("run-b", 9, &[])).is_none(),
            "another run"
        );
        assert!(f.superseded_by(b"{not json").is_none());
        assert!(f.superseded_by(b"{\"run_id\": \"run-a\"}").is_none());
        assert!(c.ended().is_none(), "the rule alone ends nothing");
    }

    #[tokio::test]
    async fn a_fenced_worker_ends_its_job() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().to_str().unwrap()).unwrap();
        let c = Control::default();
        let f = fence(&c);
        assert!(f.check(&store).await.is_none(), "no coordinator.json");
        store
            .put(COORDINATOR_KEY, state("run-a", 3, &["w1"]).into())
            .await
            .unwrap();
        assert!(f.check(&store).await.is_none());
        assert!(c.ended().is_none());
        store
            .put(COORDINATOR_KEY, state("run-a", 5, &["w7"]).into())
            .await
            .unwrap();
        let reason = f.check(&store).await.unwrap();
        assert!(
            reason.contains("generation 5 without this worker"),
            "{reason}"
        );
        assert_eq!(c.ended().as_deref(), Some(reason.as_str()));
    }
}
