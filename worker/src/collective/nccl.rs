//! NCCL all-reduce of CUDA gradients (cargo feature `nccl`), through cudarc's raw NCCL
//! bindings. libcuda and libnccl are loaded at run time, so the feature builds anywhere;
//! [`Nccl::available`] says whether they load here.
//!
//! The communicator is formed per generation over the ranks of the CPU ring, which also
//! carries NCCL's unique id from rank 0 to the others (so the coordinator needs no CUDA).
//! Only the gradient all-reduce — the bulk of the traffic — runs on NCCL, in place on the
//! flat gradient buffer on torch's default stream; the small collectives (loss sums, the
//! contrastive all-gather, checksums, state broadcasts) stay on the ring.
//!
//! Not verified on a GPU yet (no GPU was available where it was written): run
//! `scripts/gpu-check.sh` on a CUDA machine.

use std::mem::MaybeUninit;

use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError, Op};

/// An NCCL communicator over the ranks of one generation.
pub struct Nccl {
    comm: sys::ncclComm_t,
    world: usize,
}

// SAFETY: the communicator is used from one thread at a time (the training thread owns the
// collective); NCCL communicators may be used from any thread.
unsafe impl Send for Nccl {}

fn nccl_err(op: Op, what: &str, e: result::NcclError) -> CollectiveError {
    CollectiveError::Device {
        op,
        reason: format!("NCCL {what} failed: {:?}", e.0),
    }
}

impl Nccl {
    /// Whether libcuda and libnccl can be loaded on this machine.
    pub fn available() -> bool {
        // SAFETY: only probes whether the shared libraries load.
        unsafe { cudarc::driver::sys::is_culib_present() && sys::is_culib_present() }
    }

    /// Forms the communicator of `ring`'s ranks on the current CUDA device: rank 0 makes
    /// the unique id and broadcasts it over the ring; every rank then joins.
    pub fn new(ring: &mut dyn Collective) -> Result<Self, CollectiveError> {
        let (rank, world) = (ring.rank(), ring.world_size());
        let mut id = if rank == 0 {
            let u =
                result::get_uniqueid().map_err(|e| nccl_err(Op::Handshake, "get_uniqueid", e))?;
            u.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        ring.broadcast_bytes(&mut id, 0)?;
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        if id.len() != uid.internal.len() {
            return Err(CollectiveError::Device {
                op: Op::Handshake,
                reason: format!("NCCL unique id of {} bytes from rank 0", id.len()),
            });
        }
        for (d, s) in uid.internal.iter_mut().zip(&id) {
            *d = *s as ::core::ffi::c_char;
        }
        let mut comm = MaybeUninit::<sys::ncclComm_t>::uninit();
        // SAFETY: `comm` is a valid out-pointer; every rank calls this with the same id.
        unsafe { result::comm_init_rank(comm.as_mut_ptr(), world as i32, uid, rank as i32) }
            .map_err(|e| nccl_err(Op::Handshake, "comm_init_rank", e))?;
        tracing::info!(rank, world, "NCCL communicator formed");
        Ok(Nccl {
            // SAFETY: initialised by a successful comm_init_rank.
            comm: unsafe { comm.assume_init() },
            world,
        })
    }

    /// Replaces the contiguous fp32 CUDA tensor `t` by its mean over all ranks (NCCL sum
    /// in place, then a division by the world size), ordered on torch's default stream.
    pub fn all_reduce_mean(&mut self, t: &Tensor) -> Result<(), CollectiveError> {
        let op = Op::AllReduceMean;
        if !matches!(t.device(), Device::Cuda(_)) || t.kind() != Kind::Float || !t.is_contiguous() {
            return Err(CollectiveError::InvalidArgument {
                op,
                reason: "NCCL all-reduce needs a contiguous fp32 CUDA tensor".into(),
            });
        }
        let n = t.numel();
        let ptr = t.data_ptr();
        // SAFETY: `ptr` addresses `n` fp32 values on this rank's device; in-place
        // all-reduce is allowed; the null stream is torch's default (legacy) stream.
        unsafe {
            result::all_reduce(
                ptr,
                ptr,
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| nccl_err(op, "all_reduce", e))?;
        tch::no_grad(|| {
            let _ = t.shallow_clone().g_div_scalar_(self.world as f64);
        });
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by comm_init_rank and is not used after.
        // Abort rather than destroy: a peer may be gone, and destroy would wait for it.
        let _ = unsafe { result::comm_abort(self.comm) };
    }
}
