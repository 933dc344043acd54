//! `scfm-worker bench`: training-step throughput of scfm vs the same model in PyTorch
//! eager, side by side in one run (same weights, same batch, same threads), interleaved
//! over several rounds so machine noise hits both alike. Prints steps/s, cells/s and the
//! ratio per preset.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use scfm_common::config::ModelConfig;
use scfm_common::config::model::special;
use scfm_common::rng::Rng;
use scfm_common::tokenizer::Batch;
use serde::Serialize;
use tch::{Device, Kind, Tensor, nn};

use crate::checkpoint::tensors_to_safetensors;
use crate::collective::LocalCollective;
use crate::error::{Result, WorkerError};
use crate::model::{Inputs, ScfmModel};
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm};
use crate::params::FlatParams;
use crate::step::forward_backward;

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    /// Presets to measure.
    pub presets: Vec<String>,
    /// Cells per batch (each gives two views, so 2x sequences).
    pub cells: usize,
    /// Tokens per sequence (all sequences full: the preset's length unless overridden).
    pub seq_len: Option<usize>,
    /// Gene vocabulary size.
    pub genes: usize,
    /// Intra-op threads for both sides.
    pub threads: usize,
    /// Timed steps per round.
    pub steps: usize,
    /// Untimed warm-up steps per round.
    pub warmup: usize,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Python interpreter with torch.
    pub python: PathBuf,
    /// Repository root (for benches/torch_train.py).
    pub repo: PathBuf,
}

/// One preset's result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Preset.
    pub preset: String,
    /// Parameters.
    pub params: i64,
    /// scfm steps/s per round.
    pub scfm: Vec<f64>,
    /// PyTorch steps/s per round.
    pub torch: Vec<f64>,
    /// median(scfm) / median(torch).
    pub ratio: f64,
    /// Cells per step.
    pub cells: usize,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

/// A batch of `2 * cells` full-length sequences with random genes, bins and 15% masking.
pub(crate) fn synthetic_batch(cfg: &ModelConfig, cells: usize, genes: usize, len: usize) -> Batch {
    let mut rng = Rng::new(42, &[]);
    let n = 2 * cells;
    let mut b = Batch {
        n,
        len,
        ..Default::default()
    };
    for _ in 0..n {
        let picked = rng.sample_sorted(genes, len - 1);
        let masked = rng.sample_sorted(
            len - 1,
            ((len - 1) as f64 * cfg.mask_ratio).round().max(1.0) as usize,
        );
        let mut is_masked = vec![false; len];
        for m in masked {
            is_masked[m + 1] = true;
        }
        for i in 0..len {
            let (g, bin, val) = if i == 0 {
                (special::CLS, 0, 0.0)
            } else {
                let bin = 1 + rng.below(cfg.n_bins.max(2) as u64 - 1) as i64;
                (
                    picked[i - 1] as i64 + special::OFFSET,
                    bin,
                    0.1 * bin as f32,
                )
            };
            b.genes.push(g);
            b.target_bins.push(bin);
            b.target_values.push(val);
            b.masked.push(is_masked[i]);
            b.input_bins
                .push(if is_masked[i] { cfg.n_bins as i64 } else { bin });
            b.input_values.push(if is_masked[i] { 0.0 } else { val });
        }
    }
    b
}

fn io_err(p: &Path, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Internal(format!("{}: {e}", p.display()))
}

/// Runs the benchmark and prints a table; returns the results.
pub fn run(args: &BenchArgs) -> Result<Vec<BenchResult>> {
    tch::set_num_threads(args.threads as i32);
    let script = args.repo.join("benches/torch_train.py");
    let mut results = Vec::new();
    for preset in &args.presets {
        let mut cfg = ModelConfig::preset(preset)?;
        if let Some(l) = args.seq_len {
            cfg.max_seq_len = l;
        }
        let len = cfg.max_seq_len;
        let batch = synthetic_batch(&cfg, args.cells, args.genes, len);
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = ScfmModel::new(&vs, &cfg, args.genes)?;
        let mut params = FlatParams::new(&vs);
        params.attach_grads();
        let dir = tempfile::tempdir().map_err(|e| io_err(Path::new("tmp"), e))?;
        let weights: Vec<(String, Tensor)> = params
            .slots
            .iter()
            .map(|s| (s.name.clone(), params.view(s).copy()))
            .collect();
        let wpath = dir.path().join("model.safetensors");
        std::fs::write(&wpath, tensors_to_safetensors(&weights, None)?)
            .map_err(|e| io_err(&wpath, e))?;
        let inputs = Inputs::from_batch(&batch, Device::Cpu);
        let io = vec![
            ("genes".to_string(), inputs.genes.to_kind(Kind::Float)),
            ("bins".to_string(), inputs.bins.to_kind(Kind::Float)),
            ("values".to_string(), inputs.values.shallow_clone()),
            ("masked".to_string(), inputs.masked.to_kind(Kind::Float)),
            (
                "target_bins".to_string(),
                inputs.target_bins.to_kind(Kind::Float),
            ),
            (
                "target_values".to_string(),
                inputs.target_values.shallow_clone(),
            ),
        ];
        let iopath = dir.path().join("io.safetensors");
        std::fs::write(&iopath, tensors_to_safetensors(&io, None)?)
            .map_err(|e| io_err(&iopath, e))?;
        let meta = serde_json::json!({"model": cfg, "n_genes": args.genes});
        std::fs::write(dir.path().join("config.json"), meta.to_string())
            .map_err(|e| io_err(dir.path(), e))?;
        let opt_cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(opt_cfg, &params);
        let micro = [inputs];
        let mut single = LocalCollective::new();
        let mut step = 0u64;
        let mut one_step = |params: &FlatParams, opt: &mut AdamW| {
            let t0 = Instant::now();
            params.zero_grad();
            let t1 = Instant::now();
            forward_backward(&model, &micro, 0, step, false, false, &mut single)
                .expect("a local step cannot fail");
            let t2 = Instant::now();
            clip_grad_norm(params, Some(1.0));
            let t3 = Instant::now();
            opt.update(params, 1e-4);
            if std::env::var_os("SCFM_BENCH_TRACE").is_some() {
                eprintln!(
                    "zero {:?} fwd+bwd {:?} clip {:?} adamw {:?}",
                    t1 - t0,
                    t2 - t1,
                    t3 - t2,
                    t3.elapsed()
                );
            }
            step += 1;
        };
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        eprintln!(
            "bench {preset}: {} parameters, {} cells x 2 views x {len} tokens, {} threads",
            params.numel(),
            args.cells,
            args.threads
        );
        for round in 0..args.rounds {
            for _ in 0..args.warmup {
                one_step(&params, &mut opt);
            }
            let t = Instant::now();
            for _ in 0..args.steps {
                one_step(&params, &mut opt);
            }
            let sps = args.steps as f64 / t.elapsed().as_secs_f64();
            ours.push(sps);
            let out = Command::new(&args.python)
                .arg(&script)
                .arg("--dir")
                .arg(dir.path())
                .args([
                    "--steps",
                    &args.steps.to_string(),
                    "--warmup",
                    &args.warmup.to_string(),
                    "--threads",
                    &args.threads.to_string(),
                ])
                .output()
                .map_err(|e| io_err(&args.python, e))?;
            if !out.status.success() {
                return Err(WorkerError::Internal(format!(
                    "{} failed: {}",
                    script.display(),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
                WorkerError::Internal(format!("bad output from {}: {e}", script.display()))
            })?;
            let tps = v["steps_per_s"].as_f64().unwrap_or(f64::NAN);
            theirs.push(tps);
            eprintln!("  round {round}: scfm {sps:.3} steps/s, pytorch {tps:.3} steps/s");
        }
        let ratio = median(&ours) / median(&theirs);
        results.push(BenchResult {
            preset: preset.clone(),
            params: params.numel(),
            scfm: ours,
            torch: theirs,
            ratio,
            cells: args.cells,
        });
    }
    println!(
        "{:<8} {:>12} {:>14} {:>14} {:>12} {:>12} {:>7}",
        "preset",
        "params",
        "scfm steps/s",
        "torch steps/s",
        "scfm cells/s",
        "torch cells/s",
        "ratio"
    );
    for r in &results {
        let (a, b) = (median(&r.scfm), median(&r.torch));
        println!(
            "{:<8} {:>12} {:>14.3} {:>14.3} {:>12.1} {:>12.1} {:>6.2}x",
            r.preset,
            r.params,
            a,
            b,
            a * r.cells as f64,
            b * r.cells as f64,
            r.ratio
        );
    }
    Ok(results)
}
