//! `scfm-worker nccl-check`: NCCL on this machine's first visible GPU with a one-rank
//! communicator — the library loads, a communicator forms on the device, all-reduce runs
//! and leaves the values as they should be. The only NCCL check a one-GPU machine allows
//! (NCCL refuses two ranks on one GPU). Reports the bandwidth of the in-place all-reduce:
//! the algorithm bandwidth (bytes / time); the bus bandwidth, 2(n-1)/n of it, is 0 for one
//! rank and is given for the record.

use serde::Serialize;

use crate::error::{Result, WorkerError};

/// What `nccl-check` measured.
#[derive(Debug, Clone, Serialize)]
pub struct NcclCheck {
    /// The NCCL library that loaded (version and path).
    pub library: String,
    /// Ranks of the communicator (1).
    pub world: usize,
    /// Bytes all-reduced per call.
    pub bytes: usize,
    /// Timed calls.
    pub iters: usize,
    /// Mean seconds per all-reduce.
    pub seconds: f64,
    /// Algorithm bandwidth, GB/s (bytes / seconds).
    pub algbw_gbs: f64,
    /// Bus bandwidth, GB/s (algbw x 2(n-1)/n: 0 with one rank).
    pub busbw_gbs: f64,
    /// Whether every value came back as it went in (the mean over one rank).
    pub values_ok: bool,
}

/// Forms a one-rank NCCL communicator on CUDA device 0 and all-reduces `mb` MiB of fp32
/// `iters` times. Errors name what is missing: the `nccl` feature, a CUDA device, or the
/// library (with every place looked at).
pub fn run(mb: usize, iters: usize) -> Result<NcclCheck> {
    if mb == 0 || iters == 0 {
        return Err(WorkerError::Backend(
            "nccl-check: --mb and --iters must be at least 1".into(),
        ));
    }
    imp::run(mb, iters)
}

#[cfg(not(feature = "nccl"))]
mod imp {
    use super::*;

    pub fn run(_mb: usize, _iters: usize) -> Result<NcclCheck> {
        Err(WorkerError::Backend(
            "nccl-check: this scfm-worker was built without the `nccl` cargo feature \
             (build it with `--features nccl`, as scripts/gpu-bundle.sh does)"
                .into(),
        ))
    }
}

#[cfg(feature = "nccl")]
mod imp {
    use std::time::{Duration, Instant};

    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::collective::nccl::{Nccl, describe, load};

    pub fn run(mb: usize, iters: usize) -> Result<NcclCheck> {
        if !tch::Cuda::is_available() {
            return Err(WorkerError::Backend(format!(
                "nccl-check: no CUDA device is usable (libtorch sees {} devices; \
                 CUDA_VISIBLE_DEVICES={:?}): NCCL needs a GPU",
                tch::Cuda::device_count(),
                std::env::var("CUDA_VISIBLE_DEVICES").ok()
            )));
        }
        let lib = load().map_err(|e| WorkerError::Backend(e.to_string()))?;
        let mut exchange = |id: Option<Vec<u8>>| {
            id.ok_or_else(|| crate::collective::CollectiveError::Device {
                op: crate::collective::Op::Handshake,
                reason: "a one-rank communicator has no other rank to fetch the id from".into(),
            })
        };
        let mut nccl = Nccl::new(0, 1, Duration::from_secs(60), &mut exchange)?;
        let n = (mb << 20) / 4;
        let t = Tensor::ones([n as i64], (Kind::Float, Device::Cuda(0)));
        for _ in 0..3 {
            nccl.all_reduce_mean(&t)?;
        }
        tch::Cuda::synchronize(0);
        let start = Instant::now();
        for _ in 0..iters {
            nccl.all_reduce_mean(&t)?;
        }
        tch::Cuda::synchronize(0);
        let seconds = start.elapsed().as_secs_f64() / iters as f64;
        let values_ok = t.eq(1.0).all().int64_value(&[]) == 1;
        let bytes = n * 4;
        let algbw = bytes as f64 / seconds / 1e9;
        Ok(NcclCheck {
            library: describe(lib),
            world: 1,
            bytes,
            iters,
            seconds,
            algbw_gbs: algbw,
            busbw_gbs: 0.0,
            values_ok,
        })
    }
}

#[cfg(test)]
mod tests {
    /// Without a GPU (or without the feature) the check fails and says why, naming what
    /// is missing; it never reports success.
    #[test]
    fn without_a_gpu_the_check_says_what_is_missing() {
        if tch::Cuda::is_available() {
            eprintln!("SKIPPED: a CUDA device is present (the GPU bundle runs this for real)");
            return;
        }
        let e = super::run(1, 1).unwrap_err().to_string();
        if cfg!(feature = "nccl") {
            assert!(e.contains("no CUDA device is usable"), "{e}");
        } else {
            assert!(e.contains("without the `nccl` cargo feature"), "{e}");
        }
        let e = super::run(0, 1).unwrap_err().to_string();
        assert!(e.contains("--mb"), "{e}");
    }
}
