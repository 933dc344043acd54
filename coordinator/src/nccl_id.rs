//! NCCL's unique id of a generation, relayed by the coordinator.
//!
//! `ncclGetUniqueId` embeds the address of a bootstrap socket that the calling process
//! opens, so the id must be made by the process that becomes NCCL rank 0 (the
//! coordinator has neither CUDA nor libnccl); the coordinator hands it to the other
//! ranks of the same generation. Only rank 0 of the current generation may publish, once;
//! an id never outlives its generation.

use crate::state::JobState;

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// Why an NCCL id exchange was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NcclIdRefusal {
    /// The worker is not registered.
    UnknownWorker(String),
    /// The request names another generation than the current one.
    NotCurrent {
        /// The generation asked about.
        asked: u64,
        /// The current generation.
        current: u64,
    },
    /// The worker is not a member of the current generation.
    NotMember(String),
    /// A rank other than 0 tried to publish.
    NotRankZero(usize),
    /// The id to publish does not have [`NCCL_ID_BYTES`] bytes.
    BadLength(usize),
    /// Rank 0 published a different id before.
    Conflict,
}

impl std::fmt::Display for NcclIdRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NcclIdRefusal::UnknownWorker(w) => write!(f, "unknown worker `{w}`"),
            NcclIdRefusal::NotCurrent { asked, current } => {
                write!(f, "generation {asked} is not the current one ({current})")
            }
            NcclIdRefusal::NotMember(w) => {
                write!(f, "worker `{w}` is not a member of the current generation")
            }
            NcclIdRefusal::NotRankZero(r) => {
                write!(f, "only rank 0 publishes the NCCL id, not rank {r}")
            }
            NcclIdRefusal::BadLength(n) => {
                write!(f, "an NCCL id has {NCCL_ID_BYTES} bytes, not {n}")
            }
            NcclIdRefusal::Conflict => {
                write!(
                    f,
                    "rank 0 already published another NCCL id for this generation"
                )
            }
        }
    }
}

impl JobState {
    /// Publishes (`publish` = rank 0's id) or reads the NCCL id of `generation` for
    /// `worker`: `Ok(Some(id))` once rank 0 published it, `Ok(None)` before.
    pub fn exchange_nccl_id(
        &mut self,
        worker: &str,
        generation: u64,
        publish: Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>, NcclIdRefusal> {
        if !self.workers.contains_key(worker) {
            return Err(NcclIdRefusal::UnknownWorker(worker.into()));
        }
        if generation != self.generation {
            return Err(NcclIdRefusal::NotCurrent {
                asked: generation,
                current: self.generation,
            });
        }
        let rank = self
            .members
            .iter()
            .position(|m| m == worker)
            .ok_or_else(|| NcclIdRefusal::NotMember(worker.into()))?;
        let current = self
            .nccl_id
            .as_ref()
            .filter(|(g, _)| *g == generation)
            .map(|(_, id)| id.clone());
        let Some(id) = publish else {
            return Ok(current);
        };
        if rank != 0 {
            return Err(NcclIdRefusal::NotRankZero(rank));
        }
        if id.len() != NCCL_ID_BYTES {
            return Err(NcclIdRefusal::BadLength(id.len()));
        }
        match current {
            // A retried publication of the same id is fine.
            Some(c) if c != id => Err(NcclIdRefusal::Conflict),
            _ => {
                tracing::info!(generation, "NCCL id published by rank 0");
                self.nccl_id = Some((generation, id.clone()));
                Ok(Some(id))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::Phase;

    /// A running job of two members (w0000 rank 0, w0001 rank 1) in generation 1, and an
    /// extra registered worker that is not a member.
    fn running() -> JobState {
        let mut s = JobState::new(2, 3, Duration::from_secs(60), Duration::from_secs(30));
        for port in 1..=3 {
            let addr = format!("127.0.0.1:{port}").parse().unwrap();
            s.register(addr, "h".into(), "cuda:0".into(), port).unwrap();
        }
        s.phase = Phase::Running;
        s.generation = 1;
        s.members = vec!["w0000".into(), "w0001".into()];
        s
    }

    #[test]
    fn rank_zero_publishes_and_the_others_read() {
        let mut s = running();
        let id = vec![7u8; NCCL_ID_BYTES];
        assert_eq!(s.exchange_nccl_id("w0001", 1, None), Ok(None));
        assert_eq!(
            s.exchange_nccl_id("w0000", 1, Some(id.clone())),
            Ok(Some(id.clone()))
        );
        assert_eq!(s.exchange_nccl_id("w0001", 1, None), Ok(Some(id.clone())));
        // Publishing the same id again is harmless; another one is a conflict.
        assert_eq!(
            s.exchange_nccl_id("w0000", 1, Some(id.clone())),
            Ok(Some(id.clone()))
        );
        assert_eq!(
            s.exchange_nccl_id("w0000", 1, Some(vec![8; NCCL_ID_BYTES])),
            Err(NcclIdRefusal::Conflict)
        );
        // The id does not outlive its generation.
        s.generation = 2;
        assert_eq!(s.exchange_nccl_id("w0001", 2, None), Ok(None));
    }

    #[test]
    fn refusals_name_the_problem() {
        let mut s = running();
        let id = vec![1u8; NCCL_ID_BYTES];
        let e = s
            .exchange_nccl_id("w0001", 1, Some(id.clone()))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "only rank 0 publishes the NCCL id, not rank 1"
        );
        let e = s
            .exchange_nccl_id("w0000", 1, Some(vec![1; 5]))
            .unwrap_err();
        assert_eq!(e.to_string(), "an NCCL id has 128 bytes, not 5");
        let e = s
            .exchange_nccl_id("w0000", 3, Some(id.clone()))
            .unwrap_err();
        assert_eq!(e.to_string(), "generation 3 is not the current one (1)");
        let e = s.exchange_nccl_id("w0002", 1, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "worker `w0002` is not a member of the current generation"
        );
        let e = s.exchange_nccl_id("w9", 1, None).unwrap_err();
        assert_eq!(e.to_string(), "unknown worker `w9`");
    }
}
