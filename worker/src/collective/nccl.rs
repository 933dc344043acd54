//! NCCL all-reduce of CUDA gradients (cargo feature `nccl`). libnccl is loaded at run time
//! from the places `nccl_lib` lists (the pip wheel's `libnccl.so.2` next to the loaded
//! torch, `$SCFM_NCCL_LIBRARY`, the dynamic linker's search), so the feature builds
//! anywhere; [`load`] says what was loaded or every place looked at and why each failed.
//! Only the five NCCL functions used here are bound (their C ABI is stable across NCCL 2.x).
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
//! Not verified on a GPU yet (no GPU was available where it was written): the GPU bundle
//! (`scripts/gpu-bundle.sh`, then `gpu-run.sh` on a CUDA machine) checks it.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

use super::nccl_lib::{Candidate, process_candidates};
use super::{CollectiveError, Op};

/// `ncclComm_t`.
type RawHandle = *mut c_void;

/// `ncclUniqueId`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

/// `ncclSuccess`.
const SUCCESS: c_int = 0;
/// `ncclFloat32`.
const FLOAT32: c_int = 7;
/// `ncclSum`.
const SUM: c_int = 0;

/// The loaded NCCL library and the functions scfm calls.
pub struct NcclLib {
    /// The file (or name) it was loaded from.
    pub path: String,
    /// `ncclGetVersion`, e.g. 22907 for 2.29.7.
    pub version: i32,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut RawHandle, c_int, UniqueId, c_int) -> c_int,
    #[allow(clippy::type_complexity)]
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawHandle,
        *mut c_void,
    ) -> c_int,
    comm_abort: unsafe extern "C" fn(RawHandle) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(RawHandle, *mut c_int) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    _lib: libloading::Library,
}

impl NcclLib {
    /// `2.29.7` from [`NcclLib::version`].
    pub fn version_string(&self) -> String {
        let v = self.version;
        if v >= 10000 {
            format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
        } else {
            format!("{}.{}.{}", v / 1000, (v / 100) % 10, v % 100)
        }
    }

    /// NCCL's text for a result code.
    fn error_string(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let p = unsafe { (self.get_error_string)(code) };
        if p.is_null() {
            return format!("NCCL error {code}");
        }
        // SAFETY: non-null, NUL-terminated, static.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
        format!("{s} (NCCL error {code})")
    }

    /// Loads the library at `path` (a file path or a name for the dynamic linker) and
    /// resolves the functions scfm needs; checks that `ncclGetVersion` answers.
    fn open(path: &str) -> Result<NcclLib, String> {
        // SAFETY: loading NCCL runs its initialisers, which only set up its own state.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the type is the NCCL 2.x C signature of the symbol.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("{} is missing: {e}", $name))?
            };
        }
        let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = sym!("ncclGetVersion");
        let mut version: c_int = 0;
        // SAFETY: `version` is a valid out-pointer.
        let r = unsafe { get_version(&mut version) };
        if r != SUCCESS || version <= 0 {
            return Err(format!("ncclGetVersion failed (code {r})"));
        }
        Ok(NcclLib {
            path: path.to_string(),
            version,
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            all_reduce: sym!("ncclAllReduce"),
            comm_abort: sym!("ncclCommAbort"),
            comm_get_async_error: sym!("ncclCommGetAsyncError"),
            get_error_string: sym!("ncclGetErrorString"),
            _lib: lib,
        })
    }
}

/// Loads NCCL from the first of `candidates` that loads; the error names every candidate
/// and why it failed.
pub fn load_from(candidates: &[Candidate]) -> Result<NcclLib, String> {
    let mut tried = Vec::new();
    for c in candidates {
        let path = match c {
            Candidate::File(p) if !p.exists() => {
                tried.push(format!("{c}: no such file"));
                continue;
            }
            Candidate::File(p) => p.to_string_lossy().into_owned(),
            Candidate::Name(n) => n.to_string(),
        };
        match NcclLib::open(&path) {
            Ok(l) => return Ok(l),
            Err(e) => tried.push(format!("{c}: {e}")),
        }
    }
    Err(format!(
        "no usable NCCL library; looked for: {} (set {} to the file, e.g. \
         <site-packages>/nvidia/nccl/lib/libnccl.so.2 of the nvidia-nccl wheel)",
        tried.join("; "),
        super::nccl_lib::NCCL_LIBRARY_ENV
    ))
}

/// The NCCL library of this process, loaded once from [`process_candidates`].
pub fn load() -> Result<&'static NcclLib, &'static str> {
    static LIB: OnceLock<Result<NcclLib, String>> = OnceLock::new();
    LIB.get_or_init(|| load_from(&process_candidates()))
        .as_ref()
        .map_err(String::as_str)
}

/// The PCI bus id of CUDA device 0 of this process (after `CUDA_VISIBLE_DEVICES`), from
/// the driver (`libcuda.so.1`): the physical GPU, as NCCL tells ranks apart; `None` without
/// a driver or device.
pub fn cuda_pci_bus_id() -> Option<String> {
    type Init = unsafe extern "C" fn(c_int) -> c_int;
    type DeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type BusId = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    // SAFETY: loading the CUDA driver library runs only its own initialisers.
    let lib = unsafe { libloading::Library::new("libcuda.so.1") }.ok()?;
    // SAFETY: the types are the CUDA driver API's C signatures of these symbols.
    let (init, get, bus) = unsafe {
        (
            *lib.get::<Init>(b"cuInit\0").ok()?,
            *lib.get::<DeviceGet>(b"cuDeviceGet\0").ok()?,
            *lib.get::<BusId>(b"cuDeviceGetPCIBusId\0").ok()?,
        )
    };
    let mut dev: c_int = 0;
    let mut buf = [0 as c_char; 64];
    // SAFETY: valid out-pointers; `buf` holds 64 bytes, as passed.
    let ok =
        unsafe { init(0) == 0 && get(&mut dev, 0) == 0 && bus(buf.as_mut_ptr(), 64, dev) == 0 };
    // The library stays loaded (libtorch holds it too); the handle may close.
    ok.then(|| {
        // SAFETY: the driver wrote a NUL-terminated string into `buf`.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    })
}

/// A short description of the loaded NCCL: `NCCL 2.29.7 (<path>)`.
pub fn describe(lib: &NcclLib) -> String {
    format!(
        "NCCL {} ({})",
        lib.version_string(),
        PathBuf::from(&lib.path).display()
    )
}

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
struct RawComm(RawHandle);

// SAFETY: the handle is only moved to the thread that then owns it; NCCL communicators
// may be used from any thread.
unsafe impl Send for RawComm {}

/// The raw communicator, shared by [`Nccl`] and the ring's abort handle.
pub struct Comm {
    lib: &'static NcclLib,
    raw: RawHandle,
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
            let _ = unsafe { (self.lib.comm_abort)(self.raw) };
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // Abort rather than destroy: a peer may be gone, and destroy would wait for it.
        self.abort();
    }
}

fn nccl_err(lib: &NcclLib, op: Op, what: &str, code: c_int) -> CollectiveError {
    CollectiveError::Device {
        op,
        reason: format!("NCCL {what} failed: {}", lib.error_string(code)),
    }
}

impl Nccl {
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
        let lib = load().map_err(|e| CollectiveError::Device {
            op: Op::Handshake,
            reason: e.to_string(),
        })?;
        let id = if rank == 0 {
            let mut u = UniqueId { internal: [0; 128] };
            // SAFETY: `u` is a valid out-pointer.
            let r = unsafe { (lib.get_unique_id)(&mut u) };
            if r != SUCCESS {
                return Err(nccl_err(lib, Op::Handshake, "ncclGetUniqueId", r));
            }
            exchange(Some(u.internal.iter().map(|&c| c as u8).collect()))?
        } else {
            exchange(None)?
        };
        let mut uid = UniqueId { internal: [0; 128] };
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
                let mut comm: RawHandle = std::ptr::null_mut();
                // SAFETY: `comm` is a valid out-pointer; every rank calls this with the
                // same id.
                let r =
                    unsafe { (lib.comm_init_rank)(&mut comm, world as c_int, uid, rank as c_int) };
                let _ = tx.send(if r == SUCCESS {
                    Ok(RawComm(comm))
                } else {
                    Err(r)
                });
            })
            .map_err(|e| CollectiveError::Device {
                op: Op::Handshake,
                reason: format!("cannot start the NCCL init thread: {e}"),
            })?;
        let raw = match rx.recv_timeout(timeout) {
            Ok(Ok(RawComm(raw))) => raw,
            Ok(Err(code)) => return Err(nccl_err(lib, Op::Handshake, "ncclCommInitRank", code)),
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
                lib,
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
            let r = unsafe {
                (self.comm.lib.all_reduce)(
                    ptr,
                    ptr,
                    n,
                    FLOAT32,
                    SUM,
                    self.comm.raw,
                    std::ptr::null_mut(),
                )
            };
            if r != SUCCESS {
                return Err(nccl_err(self.comm.lib, op, "ncclAllReduce", r));
            }
        }
        // An abort from the heartbeat thread ends a reduction that waits for a lost peer.
        tch::Cuda::synchronize(device as i64);
        let aborted = self.comm.aborted.lock().unwrap_or_else(|p| p.into_inner());
        if *aborted {
            return Err(broken());
        }
        let mut state: c_int = SUCCESS;
        // SAFETY: the communicator is live (checked under the lock); `state` outlives the call.
        let r = unsafe { (self.comm.lib.comm_get_async_error)(self.comm.raw, &mut state) };
        if r != SUCCESS || state != SUCCESS {
            let lib = self.comm.lib;
            return Err(CollectiveError::Device {
                op,
                reason: format!(
                    "NCCL reports {} (query: {})",
                    lib.error_string(state),
                    lib.error_string(r)
                ),
            });
        }
        drop(aborted);
        tch::no_grad(|| {
            let _ = t.shallow_clone().g_div_scalar_(self.world as f64);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_missing_or_broken_library_is_named_with_why() {
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("libnccl.so.2");
        std::fs::write(&fake, b"not a shared library").unwrap();
        let missing = d.path().join("nope/libnccl.so.2");
        let e = load_from(&[
            Candidate::File(missing.clone()),
            Candidate::File(fake.clone()),
        ])
        .err()
        .unwrap();
        assert!(
            e.starts_with("no usable NCCL library; looked for: ")
                && e.contains(&format!("{}: no such file", missing.display()))
                && e.contains(&format!("{}: ", fake.display()))
                && e.contains("SCFM_NCCL_LIBRARY"),
            "{e}"
        );
    }

    /// The CUDA torch wheel that scripts/setup.sh installs brings `nvidia-nccl-cu13`:
    /// its `libnccl.so.2` is found next to the loaded torch and loads (no GPU needed).
    #[test]
    fn the_wheel_library_next_to_torch_loads() {
        let c = process_candidates();
        let Some(path) = super::super::nccl_lib::first_existing(&c) else {
            let reason =
                format!("no libnccl.so.2 next to the loaded torch (a CPU torch wheel?): {c:?}");
            eprintln!("SKIPPED: nccl-wheel: {reason}");
            // Counted by scripts/test.sh, as the integration tests' `skip` does.
            if let Some(log) = std::env::var_os("SCFM_SKIP_LOG").filter(|p| !p.is_empty()) {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("SCFM_SKIP_LOG");
                f.write_all(format!("nccl-wheel\t{reason}\n").as_bytes())
                    .expect("SCFM_SKIP_LOG");
            }
            return;
        };
        let lib = load_from(&c).unwrap();
        assert_eq!(Path::new(&lib.path), path);
        assert!(lib.version >= 20000, "{}", lib.version);
        assert!(describe(&lib).starts_with("NCCL 2."), "{}", describe(&lib));
    }
}
