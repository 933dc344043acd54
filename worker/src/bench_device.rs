//! `scfm-worker bench-step`: training steps of a preset on one device (CUDA or CPU) at a
//! precision, reported as steps/s, tokens/s and model FLOPs utilisation (MFU) against the
//! matmul peak of the same device and dtype measured in the same process, plus the
//! agreement of the losses on that device with fp32 on the CPU for the same weights and
//! batch, and the process's memory high-water mark. The GPU bundle
//! (`scripts/gpu-bundle.sh`) runs it on a GPU machine.
//!
//! Every sequence of the synthetic batch is full (`seq_len` tokens), so tokens per step
//! are exact. Training FLOPs per step are 3 x the analytic encoder forward FLOPs
//! ([`forward_flops`]: forward, and backward at twice the forward); the heads, embeddings
//! and element-wise ops are left out, so the MFU is a lower bound.

use std::time::Instant;

use scfm_common::config::ModelConfig;
use serde::Serialize;
use tch::{Device, Kind, Tensor, nn};

use crate::bench::synthetic_batch;
use crate::bench_embed::forward_flops;
use crate::collective::LocalCollective;
use crate::error::{Result, WorkerError};
use crate::model::{Inputs, ScfmModel, loss};
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm};
use crate::params::FlatParams;
use crate::step::forward_backward;

/// Relative tolerance of fp32 on the device against fp32 on the CPU (summation order
/// differs; cuBLAS does not use TF32 for fp32 by default in libtorch).
pub const FP32_TOLERANCE: f64 = 1e-4;
/// Relative tolerance of bf16 autocast against fp32 on the CPU (bf16 keeps 8 bits of
/// mantissa: about 0.4% per rounding, partly averaging out over a mean loss).
pub const BF16_TOLERANCE: f64 = 2e-2;

/// Settings of `bench-step`.
#[derive(Debug, Clone)]
pub struct StepBenchArgs {
    /// Presets to measure.
    pub presets: Vec<String>,
    /// `cpu` or `cuda` (CUDA device 0 of those visible).
    pub device: Device,
    /// Compute precision of the encoder: `None` = fp32, `Some(BFloat16)` = bf16 autocast.
    pub compute: Option<Kind>,
    /// Cells per step (two sequences each).
    pub cells: usize,
    /// Tokens per sequence (default: the preset's `max_seq_len`).
    pub seq_len: Option<usize>,
    /// Gene vocabulary size.
    pub genes: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// Cells of the loss-agreement batch (its forward also runs on the CPU in fp32).
    pub agree_cells: usize,
    /// Size of the square matmul that measures the peak.
    pub matmul_n: i64,
}

/// The loss of the same weights and batch on the CPU (fp32) and on the device.
#[derive(Debug, Clone, Serialize)]
pub struct LossAgreement {
    /// Cells of the batch (two sequences each).
    pub cells: usize,
    /// Total loss (dropout off) on the CPU in fp32.
    pub cpu_fp32: f64,
    /// The same on the device in fp32.
    pub device_fp32: f64,
    /// The same on the device at the benchmark's precision.
    pub device_precision: f64,
    /// |device_fp32 - cpu_fp32| / |cpu_fp32|.
    pub rel_diff_fp32: f64,
    /// |device_precision - cpu_fp32| / |cpu_fp32|.
    pub rel_diff_precision: f64,
    /// The tolerance `rel_diff_precision` is held to.
    pub tolerance: f64,
    /// Whether both differences are within their tolerances.
    pub ok: bool,
}

/// One preset's result.
#[derive(Debug, Clone, Serialize)]
pub struct StepBenchResult {
    /// Preset.
    pub preset: String,
    /// Parameters.
    pub params: i64,
    /// Cells per step.
    pub cells: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Tokens per step (2 x cells x seq_len).
    pub tokens_per_step: usize,
    /// Training FLOPs per step (3 x encoder forward).
    pub flops_per_step: f64,
    /// Timed steps.
    pub steps: usize,
    /// Steps per second over the timed steps.
    pub steps_per_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Achieved TFLOP/s (model FLOPs).
    pub tflops: f64,
    /// Model FLOPs utilisation: `tflops` / the measured matmul peak.
    pub mfu: f64,
    /// Total loss of the first and the last timed step.
    pub loss_first: f64,
    /// See `loss_first`.
    pub loss_last: f64,
    /// CPU-vs-device loss agreement.
    pub agreement: LossAgreement,
    /// Host resident-set high-water mark of this process so far (MiB, VmHWM).
    pub host_peak_mib: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct StepBenchReport {
    /// `cpu` or `cuda:0`.
    pub device: String,
    /// `fp32` or `bf16`.
    pub precision: String,
    /// The matmul peak the MFU is against (TFLOP/s, dtype of `precision`).
    pub peak_tflops: f64,
    /// Its size.
    pub matmul_n: i64,
    /// Per preset.
    pub results: Vec<StepBenchResult>,
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

fn precision_name(k: Option<Kind>) -> &'static str {
    if k == Some(Kind::BFloat16) {
        "bf16"
    } else {
        "fp32"
    }
}

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The best TFLOP/s of a warm `n x n x n` matmul of `kind` on `device` (mean of 10
/// products, best of 3 rounds, after 3 warm-up products).
pub fn matmul_peak_tflops(device: Device, kind: Kind, n: i64) -> f64 {
    tch::no_grad(|| {
        let a = Tensor::randn([n, n], (kind, device));
        let b = Tensor::randn([n, n], (kind, device));
        for _ in 0..3 {
            let _ = a.mm(&b);
        }
        sync(device);
        (0..3)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..10 {
                    let _ = a.mm(&b);
                }
                sync(device);
                10.0 * 2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64() / 1e12
            })
            .fold(0.0, f64::max)
    })
}

/// The resident-set high-water mark of this process in MiB (`VmHWM` of /proc/self/status).
pub fn host_peak_mib() -> Option<f64> {
    scfm_common::alloc::proc_status_kib("VmHWM").map(|kib| kib as f64 / 1024.0)
}

/// The total loss (MGEM and NT-Xent as weighted in the preset; dropout off) of `x`.
fn eval_loss(model: &ScfmModel, x: &Inputs) -> Result<f64> {
    tch::no_grad(|| {
        let out = model.forward(x, false);
        let mgem = model.mgem_loss(&out, x).double_value(&[]);
        let con = loss::nt_xent_blocks(&out.proj, model.cfg.temperature, 1).double_value(&[]);
        let total = model.cfg.w_mgem * mgem + model.cfg.w_contrastive * con;
        if total.is_finite() {
            Ok(total)
        } else {
            Err(WorkerError::Internal(format!(
                "non-finite loss {total} (mgem {mgem}, nt-xent {con})"
            )))
        }
    })
}

/// The relative difference `|a - b| / |b|`.
pub fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

fn bench_preset(args: &StepBenchArgs, preset: &str, peak_tflops: f64) -> Result<StepBenchResult> {
    let mut cfg = ModelConfig::preset(preset)?;
    if let Some(l) = args.seq_len {
        cfg.max_seq_len = l;
    }
    let len = cfg.max_seq_len;
    let batch = synthetic_batch(&cfg, args.cells, args.genes, len);
    let small = synthetic_batch(&cfg, args.agree_cells.max(1), args.genes, len);
    tch::manual_seed(0);
    let vs_cpu = nn::VarStore::new(Device::Cpu);
    let cpu_model = ScfmModel::new(&vs_cpu, &cfg, args.genes)?;
    let cpu_fp32 = eval_loss(&cpu_model, &Inputs::from_batch(&small, Device::Cpu))?;
    let mut vs = nn::VarStore::new(args.device);
    let mut model = ScfmModel::new(&vs, &cfg, args.genes)?;
    vs.copy(&vs_cpu)?;
    drop(cpu_model);
    let small_dev = Inputs::from_batch(&small, args.device);
    let device_fp32 = eval_loss(&model, &small_dev)?;
    model.set_compute_kind(args.compute);
    let device_precision = eval_loss(&model, &small_dev)?;
    let tolerance = if args.compute.is_some() {
        BF16_TOLERANCE
    } else {
        FP32_TOLERANCE
    };
    let (d32, dp) = (
        rel_diff(device_fp32, cpu_fp32),
        rel_diff(device_precision, cpu_fp32),
    );
    let agreement = LossAgreement {
        cells: args.agree_cells.max(1),
        cpu_fp32,
        device_fp32,
        device_precision,
        rel_diff_fp32: d32,
        rel_diff_precision: dp,
        tolerance,
        ok: d32 <= FP32_TOLERANCE && dp <= tolerance,
    };
    drop(vs_cpu);

    let mut params = FlatParams::new(&vs);
    params.attach_grads();
    let mut opt = AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        &params,
    );
    let micro = [Inputs::from_batch(&batch, args.device)];
    let mut single = LocalCollective::new();
    let mut one_step = |step: u64| -> Result<f64> {
        params.zero_grad();
        let l = forward_backward(&model, &micro, 0, step, false, false, &mut single, None)?;
        clip_grad_norm(&params, Some(1.0));
        opt.update(&params, 1e-4);
        Ok(l.total)
    };
    let seqs = 2 * args.cells;
    eprintln!(
        "bench-step {preset}: {} parameters, {} cells x 2 views x {len} tokens on {} ({})",
        params.numel(),
        args.cells,
        device_name(args.device),
        precision_name(args.compute)
    );
    for s in 0..args.warmup {
        one_step(s as u64)?;
    }
    sync(args.device);
    let t = Instant::now();
    let mut losses = Vec::with_capacity(args.steps);
    for s in 0..args.steps {
        losses.push(one_step((args.warmup + s) as u64)?);
    }
    sync(args.device);
    let secs = t.elapsed().as_secs_f64();
    let steps_per_s = args.steps as f64 / secs;
    let tokens_per_step = seqs * len;
    let flops_per_step = 3.0 * forward_flops(&cfg, len) * seqs as f64;
    let tflops = flops_per_step * steps_per_s / 1e12;
    Ok(StepBenchResult {
        preset: preset.to_string(),
        params: params.numel(),
        cells: args.cells,
        seq_len: len,
        tokens_per_step,
        flops_per_step,
        steps: args.steps,
        steps_per_s,
        tokens_per_s: steps_per_s * tokens_per_step as f64,
        tflops,
        mfu: tflops / peak_tflops,
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
        agreement,
        host_peak_mib: host_peak_mib(),
    })
}

/// Measures the peak, then each preset; prints one line per preset.
pub fn run(args: &StepBenchArgs) -> Result<StepBenchReport> {
    if args.steps == 0 || args.cells == 0 {
        return Err(WorkerError::Internal(
            "bench-step: --steps and --cells must be at least 1".into(),
        ));
    }
    let kind = args.compute.unwrap_or(Kind::Float);
    let peak = matmul_peak_tflops(args.device, kind, args.matmul_n);
    eprintln!(
        "bench-step: {} {}x{n}x{n} {} matmul peak {peak:.2} TFLOP/s",
        device_name(args.device),
        args.matmul_n,
        precision_name(args.compute),
        n = args.matmul_n
    );
    let mut results = Vec::new();
    for p in &args.presets {
        let r = bench_preset(args, p, peak)?;
        println!(
            "{:<8} {:>11} params  {:>8.3} steps/s  {:>10.0} tokens/s  {:>8.2} TFLOP/s  MFU {:>5.1}%  loss cpu {:.5} device fp32 {:.5} {} {:.5} (rel {:.1e}, tol {:.0e}: {})  host peak {} MiB",
            r.preset,
            r.params,
            r.steps_per_s,
            r.tokens_per_s,
            r.tflops,
            100.0 * r.mfu,
            r.agreement.cpu_fp32,
            r.agreement.device_fp32,
            precision_name(args.compute),
            r.agreement.device_precision,
            r.agreement.rel_diff_precision,
            r.agreement.tolerance,
            if r.agreement.ok { "ok" } else { "DIFFERS" },
            r.host_peak_mib.map_or("-".into(), |m| format!("{m:.0}")),
        );
        results.push(r);
    }
    Ok(StepBenchReport {
        device: device_name(args.device),
        precision: precision_name(args.compute).into(),
        peak_tflops: peak,
        matmul_n: args.matmul_n,
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU run of a small preset: the figures are consistent with each other and the
    /// device (here the CPU itself) agrees with the CPU reference exactly.
    #[test]
    fn cpu_bench_step_reports_consistent_figures() {
        tch::set_num_threads(1);
        let args = StepBenchArgs {
            presets: vec!["minimal".into()],
            device: Device::Cpu,
            compute: None,
            cells: 2,
            seq_len: Some(16),
            genes: 300,
            steps: 2,
            warmup: 1,
            agree_cells: 2,
            matmul_n: 128,
        };
        let r = run(&args).unwrap();
        assert_eq!(r.device, "cpu");
        assert!(r.peak_tflops > 0.0);
        let x = &r.results[0];
        assert_eq!(x.tokens_per_step, 2 * 2 * 16);
        assert!((x.tokens_per_s / x.steps_per_s - 64.0).abs() < 1e-6);
        assert!(x.mfu > 0.0 && x.mfu.is_finite());
        assert!(x.agreement.ok, "{:?}", x.agreement);
        // The same weights and batch on the same device give the same loss.
        assert_eq!(x.agreement.cpu_fp32, x.agreement.device_fp32);
        assert!(x.loss_first.is_finite() && x.loss_last.is_finite());
        assert!(x.host_peak_mib.unwrap() > 1.0);
    }

    #[test]
    fn relative_difference() {
        assert_eq!(rel_diff(1.01, 1.0), 0.010000000000000009);
        assert_eq!(rel_diff(-2.0, -2.0), 0.0);
        assert!(rel_diff(1.0, 0.0).is_finite());
    }

    #[test]
    fn steps_must_be_positive() {
        let args = StepBenchArgs {
            presets: vec!["minimal".into()],
            device: Device::Cpu,
            compute: None,
            cells: 2,
            seq_len: Some(8),
            genes: 50,
            steps: 0,
            warmup: 0,
            agree_cells: 1,
            matmul_n: 8,
        };
        let e = run(&args).unwrap_err().to_string();
        assert!(e.contains("--steps"), "{e}");
    }
}
