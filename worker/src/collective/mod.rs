//! CPU collectives for data-parallel training: the [`Collective`] trait, the single-process
//! [`LocalCollective`] and the TCP ring ([`RingCollective`]); with the `nccl` feature, NCCL
//! for CUDA gradients (`nccl`), chosen per generation by [`backend`].
//!
//! Gradients live in one flat fp32 buffer
//! that is all-reduced (mean) bucket by bucket with the classic reduce-scatter + all-gather
//! ring. Every chunk's final value is computed by exactly one rank (its owner after the
//! reduce-scatter) and then copied to the others, so all ranks end with the same bits.
//! Every wait is bounded: a peer that disconnects or stops responding turns into a
//! [`CollectiveError`] naming the peer and the operation, and the collective is then
//! unusable ([`CollectiveError::Broken`]) until the ring is re-formed (new generation).
//! Every ring connection is authenticated before any data crosses it, by a
//! challenge–response handshake keyed by the job's [`RingKey`] (`handshake`), and
//! optionally runs over TLS 1.3 with the job's certificates ([`RingTls`], `tls`).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

mod auth;
pub mod backend;
pub mod bench;
mod handshake;
mod link;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod nccl_check;
pub mod nccl_lib;
mod plan;
mod ring;
mod tls;
mod wire;

#[cfg(test)]
mod auth_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

pub use auth::RingKey;
pub use bench::{BenchRow, TlsCostRound, bench_bus_bandwidth, bench_tls_cost};
pub use ring::{DEFAULT_BUCKET_BYTES, RingCollective, RingConfig};
pub use tls::RingTls;
pub use wire::PROTOCOL_VERSION;

/// A collective operation, named in errors and checked on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Connecting to the neighbours and exchanging the hello message.
    Handshake,
    /// [`Collective::all_reduce_mean`].
    AllReduceMean,
    /// [`Collective::all_reduce_sum_f64`].
    AllReduceSumF64,
    /// [`Collective::all_gather`].
    AllGather,
    /// [`Collective::broadcast`].
    Broadcast,
    /// [`Collective::barrier`].
    Barrier,
}

impl Op {
    /// Stable wire code of the operation.
    pub(crate) fn code(self) -> u32 {
        match self {
            Op::Handshake => 0,
            Op::AllReduceMean => 1,
            Op::AllReduceSumF64 => 2,
            Op::AllGather => 3,
            Op::Broadcast => 4,
            Op::Barrier => 5,
        }
    }

    /// Inverse of [`Op::code`].
    pub(crate) fn from_code(code: u32) -> Option<Op> {
        Some(match code {
            0 => Op::Handshake,
            1 => Op::AllReduceMean,
            2 => Op::AllReduceSumF64,
            3 => Op::AllGather,
            4 => Op::Broadcast,
            5 => Op::Barrier,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Handshake => "handshake",
            Op::AllReduceMean => "all_reduce_mean",
            Op::AllReduceSumF64 => "all_reduce_sum_f64",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        })
    }
}

/// Errors of the collectives.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A socket operation with a peer failed (connection refused, reset or closed).
    #[error("{op}: i/o with rank {peer} ({addr}) failed: {source}")]
    Io {
        /// Rank of the peer.
        peer: usize,
        /// Listening address of the peer.
        addr: SocketAddr,
        /// Operation in progress.
        op: Op,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A peer did not send or accept data within the deadline.
    #[error("{op}: rank {peer} ({addr}) did not respond within {after:?}")]
    Timeout {
        /// Rank of the peer.
        peer: usize,
        /// Listening address of the peer.
        addr: SocketAddr,
        /// Operation in progress.
        op: Op,
        /// How long we waited.
        after: Duration,
    },
    /// The handshake with a neighbour failed: it did not authenticate (it does not hold
    /// the job's ring key), or its hello did not match (protocol version, world size,
    /// generation or rank).
    #[error("handshake with rank {peer} ({addr}) refused: {reason}")]
    Handshake {
        /// Rank of the peer.
        peer: usize,
        /// Listening address of the peer.
        addr: SocketAddr,
        /// What did not match.
        reason: String,
    },
    /// A peer is in a different operation or passed a different length or root.
    #[error("{op}: rank {peer} ({addr}) is out of step: {detail}")]
    Mismatch {
        /// Rank of the peer.
        peer: usize,
        /// Listening address of the peer.
        addr: SocketAddr,
        /// Operation in progress here.
        op: Op,
        /// What differs.
        detail: String,
    },
    /// The ring's TLS settings cannot be used: a certificate, key or CA that is not valid
    /// PEM or not usable, or a server name that is not one.
    #[error("ring TLS: {reason}")]
    Tls {
        /// What is wrong.
        reason: String,
    },
    /// The caller passed an impossible argument (root out of range, bad rank, ...).
    #[error("{op}: invalid argument: {reason}")]
    InvalidArgument {
        /// Operation that was called.
        op: Op,
        /// What is wrong.
        reason: String,
    },
    /// A device collective library (NCCL) failed.
    #[error("{op}: {reason}")]
    Device {
        /// Operation in progress.
        op: Op,
        /// What failed.
        reason: String,
    },
    /// An earlier operation failed; the ring must be re-formed before it can be used again.
    #[error("{op}: collective unusable after an earlier failure ({cause}); re-form the ring")]
    Broken {
        /// Operation that was called.
        op: Op,
        /// The earlier failure.
        cause: String,
    },
}

/// Collective communication between the ranks of one training world.
///
/// Every rank must call the same operations in the same order with equal lengths (and the
/// same root); a violation is detected on the wire and reported as
/// [`CollectiveError::Mismatch`] where possible.
pub trait Collective: Send {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Replaces `buf` by the element-wise mean over all ranks (sum, then divide by the
    /// world size). The result is bitwise identical on every rank.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;

    /// Replaces `buf` by the element-wise sum over all ranks, for small buffers (loss and
    /// metric sums, checksums). Summed in rank order, so bitwise identical on every rank.
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CollectiveError>;

    /// Concatenates every rank's `local` (all of equal length) in rank order.
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError>;

    /// Overwrites `buf` on every rank with `root`'s `buf`.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;

    /// The NCCL communicator for CUDA gradients, when one was formed.
    #[cfg(feature = "nccl")]
    fn nccl(&mut self) -> Option<&mut nccl::Nccl> {
        None
    }

    /// Overwrites `buf` on every rank with `root`'s bytes (any length; for small
    /// messages such as serialized state). Travels as one f32 per byte (exact).
    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        if self.world_size() == 1 {
            return check_root(root, 1);
        }
        let n = buf.len() as u64;
        // The length as four exact 16-bit quarters.
        let mut len: Vec<f32> = (0..4).map(|i| ((n >> (16 * i)) & 0xffff) as f32).collect();
        self.broadcast(&mut len, root)?;
        let n = len
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &q)| acc | ((q as u64) << (16 * i)));
        let mut v: Vec<f32> = if self.rank() == root {
            buf.iter().map(|&b| b as f32).collect()
        } else {
            vec![0.0; n as usize]
        };
        self.broadcast(&mut v, root)?;
        *buf = v.iter().map(|&x| x as u8).collect();
        Ok(())
    }
}

/// Breaks a [`RingCollective`] from another thread: both of its sockets are shut down, so
/// an operation in progress (here and at the neighbours) fails at once instead of waiting
/// for its deadline.
pub struct RingAbort {
    sockets: Vec<std::net::TcpStream>,
    /// The generation's NCCL communicator, aborted too.
    #[cfg(feature = "nccl")]
    nccl: Option<std::sync::Arc<nccl::Comm>>,
}

impl std::fmt::Debug for RingAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingAbort")
            .field("sockets", &self.sockets)
            .finish_non_exhaustive()
    }
}

impl RingAbort {
    /// Shuts the ring's sockets down (and aborts the NCCL communicator, if any, on a
    /// thread of its own: the caller never waits for NCCL).
    pub fn abort(&self) {
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        #[cfg(feature = "nccl")]
        if let Some(c) = self.nccl.clone() {
            std::thread::spawn(move || c.abort());
        }
    }
}

/// The collective of a single-process run (world size 1): every operation is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalCollective;

impl LocalCollective {
    /// Creates the world-size-1 collective.
    pub fn new() -> Self {
        LocalCollective
    }
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_mean(&mut self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_reduce_sum_f64(&mut self, _buf: &mut [f64]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        Ok(local.to_vec())
    }

    fn broadcast(&mut self, _buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        check_root(root, 1)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Checks that `root` names a rank of a world of `world` ranks.
pub(crate) fn check_root(root: usize, world: usize) -> Result<(), CollectiveError> {
    if root < world {
        Ok(())
    } else {
        Err(CollectiveError::InvalidArgument {
            op: Op::Broadcast,
            reason: format!("root {root} is not a rank of a world of size {world}"),
        })
    }
}
