//! `scfm-worker bench`: training-step throughput of scfm vs the same model in PyTorch,
//! side by side in one run (same weights, same batch, same threads) under the protocol of
//! [`crate::bench_protocol`]: every side warm in a persistent process, rounds of at least
//! ten seconds in rotated order, medians with min–max, no ratio where a spread is too
//! wide. The PyTorch baselines are the plain model, PyTorch written as well as scfm, and
//! that under `torch.compile` (benches/torch_train.py). Prints steps/s, cells/s, model
//! GFLOP/s and MFU against the fp32 matmul peak measured in the same run.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use scfm_common::config::ModelConfig;
use scfm_common::config::model::special;
use scfm_common::rng::Rng;
use scfm_common::tokenizer::Batch;
use serde::Serialize;
use tch::{Device, Kind, Tensor, nn};

use crate::bench_embed::{forward_flops, matmul_peak_gflops};
use crate::bench_protocol::{Contender, Protocol, Rates, measure, ratio, run_for};
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
    /// Intra-op threads for every side.
    pub threads: usize,
    /// Rounds, their length, warm-up and the spread bound.
    pub protocol: Protocol,
    /// PyTorch baselines (`plain`, `tuned`, `compiled`; see benches/torch_train.py).
    pub baselines: Vec<String>,
    /// Python interpreter with torch.
    pub python: PathBuf,
    /// Repository root (for benches/torch_train.py).
    pub repo: PathBuf,
}

/// One side of one preset's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct SideResult {
    /// Its steps/s per round and their summary.
    pub steps_per_s: Rates,
    /// Median cells/s.
    pub cells_per_s: f64,
    /// Median model FLOP/s (see [`PresetResult::flops_per_step`]), in GFLOP/s.
    pub gflops: f64,
    /// `gflops` / the matmul peak measured in the same run.
    pub mfu: f64,
    /// scfm's median steps/s over this side's, or why no ratio is given.
    pub scfm_ratio: std::result::Result<f64, String>,
    /// For a PyTorch baseline: its losses' relative difference from the plain model's on
    /// the batch (dropout off).
    pub check: Option<f64>,
}

/// One preset's result.
#[derive(Debug, Clone, Serialize)]
pub struct PresetResult {
    /// Preset.
    pub preset: String,
    /// Parameters.
    pub params: i64,
    /// Cells per step.
    pub cells: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Model FLOPs of one training step: 3 x the full encoder's forward FLOPs
    /// ([`crate::bench_embed::forward_flops`], every token through every layer), whatever
    /// a side skips.
    pub flops_per_step: f64,
    /// scfm first, then the PyTorch baselines.
    pub sides: Vec<SideResult>,
    /// Load averages around the measurement.
    pub load_before: Option<[f64; 3]>,
    /// See `load_before`.
    pub load_after: Option<[f64; 3]>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Best fp32 matmul GFLOP/s (1024 x 1024) at the run's threads, before the presets.
    pub peak_gflops: f64,
    /// Threads of every side.
    pub threads: usize,
    /// The protocol's settings.
    pub rounds: usize,
    /// Minimum seconds per round.
    pub round_s: f64,
    /// Spread bound for ratios.
    pub max_spread: f64,
    /// Per preset.
    pub presets: Vec<PresetResult>,
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

/// A PyTorch baseline in a persistent process (benches/torch_train.py).
struct TorchSide {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
    check: Option<f64>,
}

/// How long one answer of the PyTorch process may take beyond what was asked (compiling
/// with `torch.compile` happens in the first warm-up).
const TORCH_GRACE: Duration = Duration::from_secs(900);

impl TorchSide {
    fn start(args: &BenchArgs, dir: &Path, variant: &str) -> Result<TorchSide> {
        let script = args.repo.join("benches/torch_train.py");
        let mut child = Command::new(&args.python)
            .arg(&script)
            .arg("--dir")
            .arg(dir)
            .args(["--threads", &args.threads.to_string(), "--variant", variant])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| io_err(&args.python, e))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut side = TorchSide {
            name: format!("pytorch-{variant}"),
            child,
            stdin,
            lines,
            check: None,
        };
        let ready = side.answer(Duration::ZERO)?;
        side.check = ready["check"].as_f64();
        Ok(side)
    }

    fn answer(&mut self, asked: Duration) -> Result<serde_json::Value> {
        let line = match self.lines.recv_timeout(asked + TORCH_GRACE) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Err(io_err(Path::new("benches/torch_train.py"), e)),
            Err(_) => {
                return Err(WorkerError::Internal(format!(
                    "{}: no answer within {:?} (it exited or hung; its stderr is above)",
                    self.name,
                    asked + TORCH_GRACE
                )));
            }
        };
        serde_json::from_str(&line)
            .map_err(|e| WorkerError::Internal(format!("{}: bad answer {line:?}: {e}", self.name)))
    }

    fn ask(&mut self, cmd: &str, seconds: f64) -> Result<serde_json::Value> {
        writeln!(self.stdin, "{cmd} {seconds}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| WorkerError::Internal(format!("{}: {e}", self.name)))?;
        self.answer(Duration::from_secs_f64(seconds))
    }
}

impl Contender for TorchSide {
    fn name(&self) -> &str {
        &self.name
    }
    fn warm(&mut self, seconds: f64) -> Result<()> {
        self.ask("warm", seconds).map(|_| ())
    }
    fn round(&mut self, seconds: f64) -> Result<(u64, f64)> {
        let v = self.ask("round", seconds)?;
        Ok((
            v["steps"].as_u64().unwrap_or(0),
            v["seconds"].as_f64().unwrap_or(f64::NAN),
        ))
    }
}

impl Drop for TorchSide {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// scfm's training step, in this process.
struct ScfmSide<F: FnMut()> {
    step: F,
}

impl<F: FnMut()> Contender for ScfmSide<F> {
    fn name(&self) -> &str {
        "scfm"
    }
    fn warm(&mut self, seconds: f64) -> Result<()> {
        run_for(seconds, &mut self.step);
        Ok(())
    }
    fn round(&mut self, seconds: f64) -> Result<(u64, f64)> {
        Ok(run_for(seconds, &mut self.step))
    }
}

/// Runs the benchmark and prints a table; returns the results.
pub fn run(args: &BenchArgs) -> Result<BenchReport> {
    args.protocol.validate()?;
    tch::set_num_threads(args.threads as i32);
    let peak_gflops = matmul_peak_gflops(1024);
    eprintln!(
        "bench: fp32 matmul peak {peak_gflops:.1} GFLOP/s at {} threads",
        args.threads
    );
    let mut presets = Vec::new();
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
        let one_step = || {
            params.zero_grad();
            forward_backward(&model, &micro, 0, step, false, false, &mut single, None)
                .expect("a local step cannot fail");
            clip_grad_norm(&params, Some(1.0));
            opt.update(&params, 1e-4);
            step += 1;
        };
        eprintln!(
            "bench {preset}: {} parameters, {} cells x 2 views x {len} tokens, {} threads",
            params.numel(),
            args.cells,
            args.threads
        );
        let mut sides: Vec<Box<dyn Contender + '_>> = vec![Box::new(ScfmSide { step: one_step })];
        let mut checks = vec![None];
        for b in &args.baselines {
            let t = TorchSide::start(args, dir.path(), b)?;
            checks.push(t.check);
            sides.push(Box::new(t));
        }
        let m = measure(&args.protocol, &mut sides)?;
        drop(sides);
        let flops_per_step = 3.0 * forward_flops(&cfg, len) * (2 * args.cells) as f64;
        let ours = m.sides[0].clone();
        let result_sides = m
            .sides
            .iter()
            .zip(checks)
            .map(|(r, check)| SideResult {
                cells_per_s: r.median * args.cells as f64,
                gflops: r.median * flops_per_step / 1e9,
                mfu: r.median * flops_per_step / 1e9 / peak_gflops,
                scfm_ratio: ratio(&ours, r, args.protocol.max_spread),
                check,
                steps_per_s: r.clone(),
            })
            .collect();
        presets.push(PresetResult {
            preset: preset.clone(),
            params: params.numel(),
            cells: args.cells,
            seq_len: len,
            flops_per_step,
            sides: result_sides,
            load_before: m.load_before,
            load_after: m.load_after,
        });
    }
    let report = BenchReport {
        peak_gflops,
        threads: args.threads,
        rounds: args.protocol.rounds,
        round_s: args.protocol.round_s,
        max_spread: args.protocol.max_spread,
        presets,
    };
    print_report(&report);
    Ok(report)
}

fn fmt_load(l: Option<[f64; 3]>) -> String {
    l.map(|[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"))
        .unwrap_or_else(|| "?".into())
}

/// Prints one markdown table per preset.
pub fn print_report(r: &BenchReport) {
    println!(
        "fp32 matmul peak {:.1} GFLOP/s, {} threads; {} rounds of >= {} s per side, order rotated; ratios only where every spread <= {:.0}%",
        r.peak_gflops,
        r.threads,
        r.rounds,
        r.round_s,
        100.0 * r.max_spread
    );
    for p in &r.presets {
        println!(
            "\n{} ({} parameters, {} cells x 2 views x {} tokens; load {} -> {})\n",
            p.preset,
            p.params,
            p.cells,
            p.seq_len,
            fmt_load(p.load_before),
            fmt_load(p.load_after)
        );
        println!(
            "| side | steps/s median (min-max) | spread | cells/s | model GFLOP/s | MFU | scfm / side |"
        );
        println!("|---|---|---|---|---|---|---|");
        for s in &p.sides {
            let r = &s.steps_per_s;
            let ratio = match &s.scfm_ratio {
                _ if r.name == "scfm" => "-".to_string(),
                Ok(x) => format!("{x:.2}x"),
                Err(e) => e.clone(),
            };
            println!(
                "| {} | {:.3} ({:.3}-{:.3}) | {:.0}% | {:.1} | {:.2} | {:.1}% | {} |",
                r.name,
                r.median,
                r.min,
                r.max,
                100.0 * r.spread(),
                s.cells_per_s,
                s.gflops,
                100.0 * s.mfu,
                ratio
            );
        }
    }
}
