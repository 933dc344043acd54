//! One training step's maths across workers: device choice, precision, the loss
//! composition that makes N workers with batch B equal one worker with batch N·B, and
//! the gradient all-reduce.
//!
//! Each worker computes, per micro-batch,
//! `W · Σ_local CE / M_global` for MGEM (`M_global` = masked tokens on all workers, one
//! tiny all-reduce) and `W · NT-Xent(global batch)` for the contrastive loss, where the
//! global batch is the all-gathered projections with this worker's slice left live
//! (so gradients flow to the local slice and the value is exact). Averaging the
//! gradients over the W workers then gives exactly the gradient of the single-worker loss
//! on the whole global batch.

use std::time::Instant;

use scfm_common::config::{Device as DeviceChoice, Precision};
use scfm_common::rng::derive_seed;
use tch::{Device, Kind, Tensor};

use crate::collective::Collective;
use crate::data::stream;
use crate::error::{Result, WorkerError};
use crate::model::stages::Cuts;
use crate::model::{Inputs, ScfmModel, loss};
use crate::overlap::{self, AllReduceTimes, Buckets};
use crate::params::FlatParams;

/// Mean losses of one step over the micro-batches (global values, equal on all workers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLosses {
    /// `w_mgem * mgem + w_contrastive * contrastive`.
    pub total: f64,
    /// MGEM loss over every worker's masked tokens.
    pub mgem: f64,
    /// NT-Xent over the global batch.
    pub contrastive: f64,
    /// GEPC mean squared error over every worker's cells (0 without the decoder).
    pub gepc: f64,
    /// Some worker was asked to stop (preemption): every worker stops after this step.
    pub stop: bool,
    /// Some worker was asked to leave for the next generation (a worker joins): every
    /// worker stops after this step and re-forms.
    pub reform: bool,
    /// The gradient all-reduce's times when it ran during the backward pass (`overlap`);
    /// `None`: the gradients are not reduced yet ([`all_reduce_grads`]).
    pub overlapped: Option<AllReduceTimes>,
}

/// Forward and backward over one step's micro-batches, gradients accumulated (each loss
/// scaled by 1/k) into the flat gradient. libtorch's generator is re-seeded from
/// `(seed, step, micro-batch, rank)` first, so dropout is reproducible. `stop` is this
/// worker's vote to stop after the step (a preemption, see [`crate::Control`]), `reform`
/// its vote to stop for a new generation; both are agreed on inside the first all-reduce.
///
/// With `overlap` (the gradient buckets of `grad`, the flat gradient), more than one
/// worker and a CPU gradient, the last micro-batch's backward pass runs in stages and the
/// gradients are all-reduced while it runs ([`crate::overlap`]); the result says so.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    model: &ScfmModel,
    micro: &[Inputs],
    seed: u64,
    step: u64,
    stop: bool,
    reform: bool,
    coll: &mut dyn Collective,
    overlap: Option<(&Buckets, &Tensor)>,
) -> Result<StepLosses> {
    let overlap = overlap.filter(|(_, g)| coll.world_size() > 1 && overlap::supported(g));
    let k = micro.len() as f64;
    let w = coll.world_size() as f64;
    let rank = coll.rank() as i64;
    let cfg = &model.cfg;
    let mut counts: Vec<f64> = micro
        .iter()
        .map(|x| x.masked.sum(Kind::Int64).int64_value(&[]) as f64)
        .collect();
    // The last entries carry this worker's stop and re-form requests, so all agree.
    counts.push(if stop { 1.0 } else { 0.0 });
    counts.push(if reform { 1.0 } else { 0.0 });
    coll.all_reduce_sum_f64(&mut counts)?;
    let reform = counts.pop().is_some_and(|s| s > 0.0);
    let stop = counts.pop().is_some_and(|s| s > 0.0);
    let mut mgem_sums = Vec::with_capacity(micro.len() + 1);
    let mut con_total = 0.0;
    let mut gepc_total = 0.0;
    let mut overlapped = None;
    for (i, x) in micro.iter().enumerate() {
        tch::manual_seed(derive_seed(seed, &[stream::TORCH, step, i as u64, rank as u64]) as i64);
        // The last micro-batch's backward completes the gradients: it runs in stages.
        let staged = overlap.filter(|_| i + 1 == micro.len());
        let mut cuts = Cuts::new();
        let out = model.forward_train_cut(x, true, staged.map(|_| &mut cuts));
        let m_global = counts[i].max(1.0);
        let mgem_sum = model.mgem_loss_train(&out, x, tch::Reduction::Sum);
        let z = &out.proj;
        let z_full = if coll.world_size() > 1 {
            let (rows, dim) = z.size2().map_err(WorkerError::from)?;
            let local: Vec<f32> =
                Vec::<f32>::try_from(&z.detach().to_device(Device::Cpu).reshape([-1]))?;
            let all = coll.all_gather(&local)?;
            let all = Tensor::from_slice(&all)
                .view([-1, dim])
                .to_device(z.device());
            let n = all.size()[0];
            let start = rank * rows;
            Tensor::cat(
                &[
                    all.narrow(0, 0, start),
                    z.shallow_clone(),
                    all.narrow(0, start + rows, n - start - rows),
                ],
                0,
            )
        } else {
            z.shallow_clone()
        };
        let con = loss::nt_xent_blocks(&z_full, cfg.temperature, coll.world_size() as i64);
        let mut total = &mgem_sum * (cfg.w_mgem * w / m_global) + &con * (cfg.w_contrastive * w);
        // Equal local batches: the mean of the workers' means is the global mean, so the
        // averaged gradient of the local mean is the gradient of the global one.
        if let Some(g) = model.gepc_loss(out.gepc.as_ref(), x) {
            gepc_total += g.double_value(&[]) / (k * w);
            total += g * cfg.w_gepc;
        }
        match staged {
            Some((buckets, grad)) => {
                overlapped = Some(overlap::backward_overlapped(
                    &(total / k),
                    cuts,
                    buckets,
                    grad,
                    coll,
                )?);
            }
            None => (total / k).backward(),
        }
        mgem_sums.push(mgem_sum.double_value(&[]) / m_global);
        con_total += con.double_value(&[]) / k;
    }
    mgem_sums.push(gepc_total);
    coll.all_reduce_sum_f64(&mut mgem_sums)?;
    let gepc = mgem_sums.pop().unwrap_or(0.0);
    let mgem = mgem_sums.iter().sum::<f64>() / k;
    Ok(StepLosses {
        total: cfg.w_mgem * mgem + cfg.w_contrastive * con_total + cfg.w_gepc * gepc,
        mgem,
        contrastive: con_total,
        gepc,
        stop,
        reform,
        overlapped,
    })
}

/// Averages the flat gradient over all workers in place; returns the seconds it took.
pub fn all_reduce_grads(params: &FlatParams, coll: &mut dyn Collective) -> Result<f64> {
    if coll.world_size() == 1 {
        return Ok(0.0);
    }
    let t = Instant::now();
    #[cfg(feature = "nccl")]
    if params.grad.device() != Device::Cpu
        && let Some(n) = coll.nccl()
    {
        n.all_reduce_mean(&params.grad)?;
        return Ok(t.elapsed().as_secs_f64());
    }
    with_host_slice(&params.grad, |g| coll.all_reduce_mean(g))??;
    Ok(t.elapsed().as_secs_f64())
}

/// Runs `f` on the tensor's fp32 values as a host slice (in place on CPU; through a host
/// copy on other devices), writing the result back.
pub fn with_host_slice<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
    if t.kind() != Kind::Float || !t.is_contiguous() {
        return Err(WorkerError::Internal(
            "collective buffers must be contiguous fp32".into(),
        ));
    }
    let n = t.numel();
    if t.device() == Device::Cpu {
        // SAFETY: `t` is a contiguous fp32 CPU tensor of `n` elements; nothing else reads
        // or writes it while `f` runs (the step is single-threaded around the collective).
        let s = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) };
        Ok(f(s))
    } else {
        let mut host = Vec::<f32>::try_from(&t.to_device(Device::Cpu))?;
        let r = f(&mut host);
        tch::no_grad(|| {
            t.shallow_clone()
                .copy_(&Tensor::from_slice(&host).to_device(t.device()))
        });
        Ok(r)
    }
}

/// An exact fingerprint of the parameters (FNV-1a over their bytes).
pub fn param_fingerprint(params: &FlatParams) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    with_host_slice(&params.flat, |s| {
        for v in s.iter() {
            for b in v.to_bits().to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
    })?;
    Ok(h)
}

/// Checks that every worker holds bit-identical parameters; a mismatch is an error
/// naming the ranks that differ.
pub fn check_params_identical(
    params: &FlatParams,
    coll: &mut dyn Collective,
    step: u64,
) -> Result<()> {
    if coll.world_size() == 1 {
        return Ok(());
    }
    let h = param_fingerprint(params)?;
    // Four 16-bit quarters travel exactly as f32.
    let quarters: Vec<f32> = (0..4).map(|i| ((h >> (16 * i)) & 0xffff) as f32).collect();
    let all = coll.all_gather(&quarters)?;
    let mine = &all[coll.rank() * 4..coll.rank() * 4 + 4];
    let differ: Vec<usize> = all
        .chunks(4)
        .enumerate()
        .filter(|(_, q)| *q != mine)
        .map(|(r, _)| r)
        .collect();
    if !differ.is_empty() {
        return Err(WorkerError::Training {
            step,
            message: format!(
                "parameter checksum of rank {} differs from ranks {differ:?}: workers diverged",
                coll.rank()
            ),
        });
    }
    Ok(())
}

/// The encoder's compute precision: bf16 for `auto` on CUDA and for `bf16`, else fp32.
pub fn compute_kind(p: Precision, device: Device) -> Option<Kind> {
    match (p, device) {
        (Precision::Fp32, _) | (Precision::Auto, Device::Cpu) => None,
        (Precision::Bf16, Device::Cpu) => {
            tracing::warn!(
                "bf16 on CPU is slow on processors without bf16 matrix units; fp32 is the CPU default"
            );
            Some(Kind::BFloat16)
        }
        _ => Some(Kind::BFloat16),
    }
}

/// Picks the device for a choice, saying which.
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    let cuda = tch::Cuda::is_available();
    let d = match (choice, cuda) {
        (DeviceChoice::Cuda, false) => {
            return Err(WorkerError::Device(
                "device `cuda` requested but no CUDA device is usable".into(),
            ));
        }
        (DeviceChoice::Cuda, true) | (DeviceChoice::Auto, true) => Device::Cuda(0),
        _ => Device::Cpu,
    };
    tracing::info!(device = ?d, cuda_available = cuda, "selected device");
    Ok(d)
}
