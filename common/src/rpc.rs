//! The gRPC protocol (generated from `proto/scfm/v1/coordinator.proto`) and the domain
//! types both sides convert it to at the edge.

/// Generated protobuf and tonic code.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("scfm.v1");
}

use std::net::SocketAddr;

use crate::error::{Error, Result};

/// Version of the coordinator protocol; checked on every register, heartbeat and status
/// request. 7: the manifest handed to workers carries `cluster.collective` (and the ranks
/// of a generation vote on the backend over the ring), and a register may be deferred
/// (UNAVAILABLE) while a restarted coordinator's places are held by taken-over workers.
/// 8: the workers' ring authenticates its connections (ring wire version 2), so a worker
/// of an earlier build, which could not join a ring, is refused at register.
/// 9: `StreamMetrics` answers with a stream of acknowledgements of what is durably
/// written, and workers resend what was not acknowledged.
pub const PROTOCOL_VERSION: u32 = 9;

/// Metadata key carrying the shared token.
pub const TOKEN_HEADER: &str = "x-scfm-token";

/// Whether a presented token equals the job's token, in constant time: both are hashed
/// (SHA-256) and the digests compared with `subtle`, so neither the position of the first
/// differing byte nor the length of the job's token shows in the time taken.
pub fn token_matches(presented: &[u8], want: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(presented)
        .as_slice()
        .ct_eq(Sha256::digest(want).as_slice())
        .into()
}

/// A worker's place in one generation of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Membership generation.
    pub generation: u64,
    /// This worker's rank.
    pub rank: usize,
    /// Number of workers.
    pub world_size: usize,
    /// Ring addresses by rank.
    pub peers: Vec<SocketAddr>,
    /// Optimizer step to start from.
    pub step: u64,
    /// Data cursor: epoch.
    pub epoch: u64,
    /// Data cursor: cells of the epoch's global order consumed.
    pub position: u64,
    /// Whether the run is already complete.
    pub finished: bool,
    /// The checkpoint directory to restore (verified by the coordinator), if any.
    pub resume_dir: Option<String>,
    /// Fewer than `min_workers` remain: the members agree on the state, checkpoint it and
    /// wait for the next generation instead of training.
    pub hold: bool,
}

impl TryFrom<pb::AssignmentResponse> for Assignment {
    type Error = Error;

    fn try_from(r: pb::AssignmentResponse) -> Result<Self> {
        let peers = r
            .peers
            .iter()
            .map(|p| {
                p.parse().map_err(|_| {
                    Error::config("assignment.peers", format!("`{p}` is not a socket address"))
                })
            })
            .collect::<Result<Vec<SocketAddr>>>()?;
        if !r.finished
            && (r.world_size == 0 || peers.len() != r.world_size as usize || r.rank >= r.world_size)
        {
            return Err(Error::config(
                "assignment",
                format!(
                    "inconsistent: rank {} of {} with {} peers",
                    r.rank,
                    r.world_size,
                    peers.len()
                ),
            ));
        }
        Ok(Assignment {
            generation: r.generation,
            rank: r.rank as usize,
            world_size: r.world_size as usize,
            peers,
            step: r.step,
            epoch: r.epoch,
            position: r.position,
            finished: r.finished,
            resume_dir: Some(r.resume_dir).filter(|d| !d.is_empty()),
            hold: r.hold,
        })
    }
}

impl From<&Assignment> for pb::AssignmentResponse {
    fn from(a: &Assignment) -> Self {
        pb::AssignmentResponse {
            generation: a.generation,
            rank: a.rank as u32,
            world_size: a.world_size as u32,
            peers: a.peers.iter().map(ToString::to_string).collect(),
            step: a.step,
            epoch: a.epoch,
            position: a.position,
            finished: a.finished,
            resume_dir: a.resume_dir.clone().unwrap_or_default(),
            hold: a.hold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matches_only_the_same_bytes() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        assert!(token_matches(b"", b""));
        assert!(!token_matches(b"s3cret", b"s3creT"));
        assert!(!token_matches(b"s3cre", b"s3cret"));
        assert!(!token_matches(b"s3cret!", b"s3cret"));
        assert!(!token_matches(b"", b"s3cret"));
    }

    #[test]
    fn assignment_roundtrip_and_validation() {
        let a = Assignment {
            generation: 3,
            rank: 1,
            world_size: 2,
            peers: vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            step: 10,
            epoch: 1,
            position: 64,
            finished: false,
            resume_dir: Some("ckpt-000000010".into()),
            hold: true,
        };
        let pb: pb::AssignmentResponse = (&a).into();
        assert_eq!(Assignment::try_from(pb.clone()).unwrap(), a);
        let bad = pb::AssignmentResponse { rank: 2, ..pb };
        assert!(
            Assignment::try_from(bad)
                .unwrap_err()
                .to_string()
                .contains("rank 2 of 2")
        );
    }
}
