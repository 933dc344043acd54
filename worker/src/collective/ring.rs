//! Ring collectives over TCP: [`RingCollective`] turns each operation into a step plan
//! ([`super::plan`]) and runs it over the two sockets of its [`Link`].
//!
//! Deadlines: every ring step (send one chunk, receive one chunk) must complete within
//! [`RingConfig::timeout`]. After any failure both sockets are shut down, which makes the
//! neighbours fail fast too, and the collective reports [`CollectiveError::Broken`] from
//! then on; the caller re-forms the ring with a new generation.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use super::auth::RingKey;
use super::link::Link;
use super::plan::{self, Step};
use super::tls::RingTls;
use super::wire::{Elem, Header};
use super::{Collective, CollectiveError, Op, check_root};

/// Default gradient bucket: 4 MiB.
pub const DEFAULT_BUCKET_BYTES: usize = 4 << 20;

/// Settings of a [`RingCollective`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingConfig {
    /// The job's ring key: every connection must prove it holds it.
    pub key: RingKey,
    /// Membership generation (from the coordinator); neighbours must agree on it.
    pub generation: u64,
    /// Bound on connecting and on every ring step; a silent peer fails within it.
    pub timeout: Duration,
    /// All-reduce bucket size in bytes (broadcast segments are a quarter of it).
    pub bucket_bytes: usize,
    /// TLS for every connection of the ring (`None`: plain TCP). Every rank of a ring
    /// must agree: a TLS rank and a plain one refuse each other.
    pub tls: Option<RingTls>,
}

impl RingConfig {
    /// A configuration with the default bucket size, over plain TCP.
    pub fn new(key: RingKey, generation: u64, timeout: Duration) -> Self {
        RingConfig {
            key,
            generation,
            timeout,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            tls: None,
        }
    }

    /// Sets the TLS settings (`None`: plain TCP).
    pub fn with_tls(mut self, tls: Option<RingTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the bucket size in bytes.
    pub fn with_bucket_bytes(mut self, bucket_bytes: usize) -> Self {
        self.bucket_bytes = bucket_bytes;
        self
    }
}

/// Data-parallel collectives over a TCP ring (see the module documentation).
pub struct RingCollective {
    rank: usize,
    world: usize,
    config: RingConfig,
    link: Option<Link>,
    seq: u64,
    broken: Option<String>,
    plan: Vec<Step>,
    gather: Vec<f64>,
    /// NCCL communicator of the same ranks, for CUDA gradients.
    #[cfg(feature = "nccl")]
    nccl: Option<super::nccl::Nccl>,
}

impl std::fmt::Debug for RingCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingCollective")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("config", &self.config)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl RingCollective {
    /// Forms an NCCL communicator over this ring's ranks within `timeout` (rank 0's unique
    /// id reaches the others through `exchange`: the coordinator); CUDA gradients are then
    /// all-reduced by NCCL.
    #[cfg(feature = "nccl")]
    pub fn attach_nccl(
        &mut self,
        timeout: std::time::Duration,
        exchange: &mut super::nccl::IdExchange,
    ) -> Result<(), CollectiveError> {
        let n = super::nccl::Nccl::new(self.rank, self.world, timeout, exchange)?;
        self.nccl = Some(n);
        Ok(())
    }

    /// Drops the NCCL communicator (aborting it): gradients go over the ring again.
    #[cfg(feature = "nccl")]
    pub fn detach_nccl(&mut self) {
        self.nccl = None;
    }

    /// A handle that breaks this ring (and aborts its NCCL communicator) from another
    /// thread (the coordinator declared a member lost while this one may be blocked in a
    /// collective); `None` for world size 1.
    pub fn abort_handle(&self) -> Option<super::RingAbort> {
        #[allow(unused_mut)]
        let mut h = self.link.as_ref().and_then(|l| l.abort_handle().ok())?;
        #[cfg(feature = "nccl")]
        {
            h.nccl = self.nccl.as_ref().map(|n| n.comm());
        }
        Some(h)
    }

    /// Forms the ring: connects to the right neighbour `peers[(rank + 1) % world_size]`
    /// and accepts the left neighbour on `listener` (already bound to `peers[rank]`),
    /// each connection authenticated with `config.key` both ways and its hello (protocol
    /// version, rank, world size, generation) checked, inside TLS 1.3 when `config.tls` is
    /// set; other connections to `listener` are refused and dropped. Retries refused
    /// connections until `config.timeout`. World size 1 opens no sockets.
    pub fn new(
        rank: usize,
        world_size: usize,
        peers: Vec<SocketAddr>,
        listener: TcpListener,
        config: RingConfig,
    ) -> Result<Self, CollectiveError> {
        let invalid = |reason: String| CollectiveError::InvalidArgument {
            op: Op::Handshake,
            reason,
        };
        if world_size == 0 || rank >= world_size {
            return Err(invalid(format!(
                "rank {rank} in a world of size {world_size}"
            )));
        }
        if peers.len() != world_size {
            return Err(invalid(format!(
                "{} peer addresses for world size {world_size}",
                peers.len()
            )));
        }
        if config.timeout.is_zero() {
            return Err(invalid("zero timeout".into()));
        }
        let link = if world_size > 1 {
            Some(Link::connect(rank, world_size, &peers, &listener, &config)?)
        } else {
            None
        };
        Ok(RingCollective {
            rank,
            world: world_size,
            config,
            link,
            seq: 0,
            broken: None,
            plan: Vec::new(),
            gather: Vec::new(),
            #[cfg(feature = "nccl")]
            nccl: None,
        })
    }

    /// The configuration the ring was formed with.
    pub fn config(&self) -> &RingConfig {
        &self.config
    }

    /// Whether an earlier failure made the ring unusable.
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Runs the plan in `self.plan` on `buf`; marks the ring broken on failure.
    fn exec<T: Elem>(
        &mut self,
        op: Op,
        count: usize,
        root: usize,
        buf: &mut [T],
    ) -> Result<(), CollectiveError> {
        if let Some(cause) = &self.broken {
            return Err(CollectiveError::Broken {
                op,
                cause: cause.clone(),
            });
        }
        let link = self.link.as_mut().expect("a world of size > 1 has a link");
        self.seq += 1;
        let head = Header {
            op,
            msg: 0,
            seq: self.seq,
            count: count as u64,
            root: root as u32,
            len: 0,
        };
        let result = link.execute(head, buf, &self.plan, self.world);
        if let Err(e) = &result {
            self.broken = Some(e.to_string());
            link.abort();
        }
        result
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    #[cfg(feature = "nccl")]
    fn nccl(&mut self) -> Option<&mut super::nccl::Nccl> {
        self.nccl.as_mut()
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let bucket = (self.config.bucket_bytes / size_of::<f32>()).max(1);
        plan::all_reduce(buf.len(), bucket, self.rank, self.world, &mut self.plan);
        self.exec(Op::AllReduceMean, buf.len(), 0, buf)
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let n = buf.len();
        let mut g = std::mem::take(&mut self.gather);
        g.clear();
        g.resize(self.world * n, 0.0);
        g[self.rank * n..(self.rank + 1) * n].copy_from_slice(buf);
        plan::all_gather(n, self.rank, self.world, &mut self.plan);
        let result = self.exec(Op::AllReduceSumF64, n, 0, &mut g);
        if result.is_ok() {
            for (i, out) in buf.iter_mut().enumerate() {
                *out = (1..self.world).fold(g[i], |acc, k| acc + g[k * n + i]);
            }
        }
        self.gather = g;
        result
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, CollectiveError> {
        if self.world == 1 {
            return Ok(local.to_vec());
        }
        let n = local.len();
        let mut out = vec![0.0f32; self.world * n];
        out[self.rank * n..(self.rank + 1) * n].copy_from_slice(local);
        plan::all_gather(n, self.rank, self.world, &mut self.plan);
        self.exec(Op::AllGather, n, 0, &mut out)?;
        Ok(out)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        check_root(root, self.world)?;
        if self.world == 1 {
            return Ok(());
        }
        let seg = (self.config.bucket_bytes / size_of::<f32>() / 4).max(1);
        plan::broadcast(buf.len(), seg, self.rank, self.world, root, &mut self.plan);
        self.exec(Op::Broadcast, buf.len(), root, buf)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        plan::all_gather(0, self.rank, self.world, &mut self.plan);
        self.exec::<f32>(Op::Barrier, 0, 0, &mut [])
    }
}
