//! NCCL all-reduce of CUDA gradients (cargo feature `nccl`), through cudarc's raw NCCL
//! bindings. libcuda and libnccl are loaded at run time, so the feature builds anywhere;
//! [`Nccl::available`] says whether they load here.
//!
//! The communicator is formed per generation over the ranks of the CPU ring. NCCL's unique
//! id embeds the address of a bootstrap socket opened by the process that makes it, so
//! rank 0 makes it and the coordinator hands it to the other ranks (`ExchangeNcclId`;
//! the coordinator needs no CUDA).
//! Only the gradient all-reduce — the bulk of the traffic — runs on NCCL, in place on the
//! flat gradient buffer on torch's default stream; the small collectives (loss sums, the
//! contrastive all-gather, checksums, state broadcasts) stay on the ring.
//!
//! A peer lost in the middle of an all-reduce would leave the NCCL kernel waiting for it
//! forever; the ring's [`super::RingAbort`] (which the heartbeat thread fires when the
//! coordinator declares a member lost) therefore also aborts the communicator, which ends
//! its pending operations, and [`Nccl::all_reduce_mean`] waits for the reduction and then
//! reports the abort (or NCCL's asynchronous error) before any gradient is used.
//!
//! Not verified on a GPU yet (no GPU was available where it was written): run
//! `scripts/gpu-check.sh` on a CUDA machine.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use super::{CollectiveError, Op};

/// How rank 0's NCCL unique id reaches the other ranks of a generation: called with
/// `Some(id)` on rank 0 (publish it) and with `None` on the others (fetch it); returns the
/// generation's id.
pub type IdExchange<'a> = dyn FnMut(Option<Vec<u8>>) -> Result<Vec<u8>, CollectiveError> + 'a;

/// An NCCL communicator over the ranks of one generation.
pub struct Nccl {
    comm: Arc<Comm>,
    world: usize,
}

/// A communicator handed over from the init thread.
struct RawComm(sys::ncclComm_t);

// SAFETY: the handle is only moved to the thread that then owns it; NCCL communicators
// may be used from any thread.
unsafe impl Send for RawComm {}

/// The raw communicator, shared by [`Nccl`] and the ring's abort handle.
pub struct Comm {
    raw: sys::ncclComm_t,
    /// Whether it was aborted (NCCL has freed it then: it is never used again). Held
    /// while an operation is enqueued, so an abort never frees it under a call.
    aborted: Mutex<bool>,
}

// SAFETY: `raw` is only passed to NCCL under the `aborted` lock, and NCCL communicators
// may be used from any thread (one call at a time, which the lock ensures).
unsafe impl Send for Comm {}
// SAFETY: as above.
unsafe impl Sync for Comm {}

impl Comm {
    /// Aborts the communicator (once): NCCL ends its pending operations and frees it.
    pub fn abort(&self) {
        let mut aborted = self.aborted.lock().unwrap_or_else(|p| p.into_inner());
        if !*aborted {
            *aborted = true;
            // SAFETY: created by comm_init_rank and, with the flag now set, never used again.
            let _ = unsafe { result::comm_abort(self.raw) };
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // Abort rather than destroy: a peer may be gone, and destroy would wait for it.
        self.abort();
    }
}

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

    /// Forms the communicator of rank `rank` of `world` on the current CUDA device: rank 0
    /// makes the unique id and publishes it through `exchange` (called with `Some(id)`),
    /// the other ranks fetch it (called with `None`); every rank then joins, within
    /// `timeout`.
    pub fn new(
        rank: usize,
        world: usize,
        timeout: std::time::Duration,
        exchange: &mut IdExchange,
    ) -> Result<Self, CollectiveError> {
        let id = if rank == 0 {
            let u =
                result::get_uniqueid().map_err(|e| nccl_err(Op::Handshake, "get_uniqueid", e))?;
            exchange(Some(u.internal.iter().map(|&c| c as u8).collect()))?
        } else {
            exchange(None)?
        };
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        if id.len() != uid.internal.len() {
            return Err(CollectiveError::Device {
                op: Op::Handshake,
                reason: format!("NCCL unique id of {} bytes from the coordinator", id.len()),
            });
        }
        for (d, s) in uid.internal.iter_mut().zip(&id) {
            *d = *s as ::core::ffi::c_char;
        }
        // comm_init_rank blocks until every rank joined; a rank that died meanwhile would
        // block it forever, so it runs on a thread of its own and is waited for with a
        // deadline (past it the thread is left behind, and the next generation tries anew).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("scfm-nccl-init".into())
            .spawn(move || {
                let mut comm = MaybeUninit::<sys::ncclComm_t>::uninit();
                // SAFETY: `comm` is a valid out-pointer; every rank calls this with the
                // same id.
                let r = unsafe {
                    result::comm_init_rank(comm.as_mut_ptr(), world as i32, uid, rank as i32)
                };
                // SAFETY: initialised by a successful comm_init_rank.
                let _ = tx.send(r.map(|_| RawComm(unsafe { comm.assume_init() })));
            })
            .map_err(|e| CollectiveError::Device {
                op: Op::Handshake,
                reason: format!("cannot start the NCCL init thread: {e}"),
            })?;
        let raw = match rx.recv_timeout(timeout) {
            Ok(Ok(RawComm(raw))) => raw,
            Ok(Err(e)) => return Err(nccl_err(Op::Handshake, "comm_init_rank", e)),
            Err(_) => {
                return Err(CollectiveError::Device {
                    op: Op::Handshake,
                    reason: format!(
                        "the NCCL communicator of {world} ranks did not form within {timeout:?} \
                         (a rank is missing)"
                    ),
                });
            }
        };
        tracing::info!(rank, world, "NCCL communicator formed");
        Ok(Nccl {
            comm: Arc::new(Comm {
                raw,
                aborted: Mutex::new(false),
            }),
            world,
        })
    }

    /// The communicator, for an abort handle.
    pub fn comm(&self) -> Arc<Comm> {
        self.comm.clone()
    }

    /// Replaces the contiguous fp32 CUDA tensor `t` by its mean over all ranks (NCCL sum
    /// in place, then a division by the world size), ordered on torch's default stream.
    /// Waits for the reduction, so that an aborted communicator (a lost peer) or an
    /// asynchronous NCCL error is reported here, before the gradient is used.
    pub fn all_reduce_mean(&mut self, t: &Tensor) -> Result<(), CollectiveError> {
        let op = Op::AllReduceMean;
        let Device::Cuda(device) = t.device() else {
            return Err(CollectiveError::InvalidArgument {
                op,
                reason: "NCCL all-reduce needs a CUDA tensor".into(),
            });
        };
        if t.kind() != Kind::Float || !t.is_contiguous() {
            return Err(CollectiveError::InvalidArgument {
                op,
                reason: "NCCL all-reduce needs a contiguous fp32 tensor".into(),
            });
        }
        let broken = || CollectiveError::Broken {
            op,
            cause: "the NCCL communicator was aborted (a member was lost)".into(),
        };
        let n = t.numel();
        let ptr = t.data_ptr();
        {
            let aborted = self.comm.aborted.lock().unwrap_or_else(|p| p.into_inner());
            if *aborted {
                return Err(broken());
            }
            // SAFETY: `ptr` addresses `n` fp32 values on this rank's device; in-place
            // all-reduce is allowed; the null stream is torch's default (legacy) stream;
            // the communicator is live (not aborted, and the lock keeps it so).
            unsafe {
                result::all_reduce(
                    ptr,
                    ptr,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm.raw,
                    std::ptr::null_mut(),
                )
            }
            .map_err(|e| nccl_err(op, "all_reduce", e))?;
        }
        // An abort from the heartbeat thread ends a reduction that waits for a lost peer.
        tch::Cuda::synchronize(device as i64);
        let aborted = self.comm.aborted.lock().unwrap_or_else(|p| p.into_inner());
        if *aborted {
            return Err(broken());
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is live (checked under the lock); `state` outlives the call.
        let r = unsafe { sys::ncclCommGetAsyncError(self.comm.raw, &mut state) };
        if r != sys::ncclResult_t::ncclSuccess || state != sys::ncclResult_t::ncclSuccess {
            return Err(CollectiveError::Device {
                op,
                reason: format!("NCCL reports {state:?} (query: {r:?})"),
            });
        }
        drop(aborted);
        tch::no_grad(|| {
            let _ = t.shallow_clone().g_div_scalar_(self.world as f64);
        });
        Ok(())
    }
}
