//! `cargo bench -p scfm-coordinator --bench scaling`: data-parallel scaling of scfm, 1
//! worker vs 2 workers (1 intra-op thread each, the same per-worker batch, `minimal`
//! preset), side by side with the same model under PyTorch DDP (gloo), 1 vs 2 processes,
//! and with scfm's 2 workers all-reducing after the backward pass instead of overlapped
//! with it (`cluster.overlap_allreduce: false`), in one run, interleaved over rounds
//! (issues 4, 14).
//!
//! Runs the built `scfm` and, next to it, `scfm-worker` (`cargo build --release
//! --workspace` first, same `CARGO_TARGET_DIR`) and the project's Python with torch
//! (`SCFM_PYTHON`, else `.venv/bin/python`).
//!
//! - **scfm**: `scfm launch JOB` plus W `scfm-worker join` processes, each in its own
//!   session (`setsid`), as torchrun starts its workers (`start_new_session=True`): with
//!   Linux's autogroup scheduling the CPUs are shared between sessions first, so on a busy
//!   machine this gives both sides the same share (`scfm local` would put all its workers
//!   in one session). Demo data (`data/mouse10k.h5ad`, prepared by `scfm prepare --settings
//!   configs/prepare-demo.yaml` into a temp dir), `training.threads: 1`, `batch` cells per
//!   worker, `steps` steps, no evaluation or checkpoint before the last step. Throughput =
//!   global cells over the wall time between rank 0's `train step=WARMUP` and `train
//!   step=STEPS` log lines (data wait, all-reduce, the other collectives and the loop's
//!   overhead all count; workers log every step, and rank 0's lines give the batches'
//!   padded length). The coordinator's metrics log gives the per-step breakdown:
//!   `step_s` (slowest worker), `allreduce_s` and `data_wait_s` (means over workers).
//! - **PyTorch DDP**: `python -m torch.distributed.run --standalone --nproc-per-node P
//!   benches/ddp_train.py`: the reference model `tests/python/scfm_ref.py` written as
//!   well as scfm (`--variant tuned`, the `tuned` baseline of `scfm-worker bench`), the
//!   same preset and vocabulary, per-rank batches of the same shapes drawn from the same
//!   prepared dataset (the views' lengths as scfm's default augmentations leave them; the
//!   table gives both sides' mean padded length), the encoder run in groups of similar
//!   length as scfm's (`training.length_groups`, default 4), 1 intra-op thread,
//!   the same steps and warm-up; it reports global cells/s over the same steps (slowest rank).
//!
//! Per run, from `/proc`: the CPUs the run's threads ran on (used) and were runnable for
//! (wanted) during the timed steps, which tells a CPU share taken by other jobs (used <
//! wanted) from threads blocked on each other (wanted < threads), and cells per CPU-second.
//!
//! The protocol of `scfm-worker bench` (`worker/src/bench_protocol.rs`) as far as whole
//! jobs allow: every run warms up untimed before its timed steps (a job cannot stay warm
//! between rounds), the order of the four runs is reversed every other round, the medians
//! come with their min–max, the load average is recorded, and a ratio is left out where
//! either run's spread exceeds the bound.
//!
//! Settings from the environment: `SCFM_BENCH_ROUNDS` (5), `SCFM_BENCH_STEPS` (130: rounds of ≥ 10 s),
//! `SCFM_BENCH_WARMUP` (10), `SCFM_BENCH_BATCH` (32), `SCFM_BENCH_TIMEOUT_S` (600 per run),
//! `SCFM_BENCH_DDP_VARIANT` (`tuned`: PyTorch written as well as scfm, fused AdamW; or
//! `plain`), `SCFM_BENCH_MAX_SPREAD` (0.25).

#[path = "scaling/procs.rs"]
mod procs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use procs::{Finished, load_avg, run_logged};

/// Benchmark settings (see the module doc for the environment variables).
struct Settings {
    rounds: usize,
    /// `tuned` (default) or `plain`: benches/ddp_train.py's model.
    ddp_variant: String,
    /// The largest (max − min) / median of a run's cells/s at which a ratio is printed.
    max_spread: f64,
    steps: u64,
    warmup: u64,
    batch: usize,
    timeout: Duration,
}

/// Paths the runs need.
struct Env {
    scfm: PathBuf,
    worker: PathBuf,
    python: PathBuf,
    /// The prepared demo dataset.
    data: PathBuf,
    /// Temp dir for jobs, logs and checkpoints.
    dir: PathBuf,
}

/// One measured run; times are per timed step.
#[derive(Clone)]
struct Run {
    /// Global cells per second over the timed steps (wall clock).
    cells_per_s: f64,
    /// Wall milliseconds per step.
    step_ms: f64,
    /// scfm: the slowest worker's `step_s` (data wait + compute), ms; DDP: NaN.
    metric_step_ms: f64,
    /// scfm: gradient ring all-reduce, ms (mean over workers); DDP: a standalone gloo
    /// all-reduce of the gradient's size after the timed steps.
    allreduce_ms: f64,
    /// scfm: data wait, ms (mean over workers); DDP: NaN (batches are made before timing).
    data_wait_ms: f64,
    /// Rank 0's tokens per sequence as padded, mean over the timed steps (the two sides'
    /// batches must be of the same shapes for the comparison to be fair).
    padded_len: f64,
    /// `/proc` figures of the run.
    cpu: Finished,
    /// 1-minute load average when the run started.
    load: f64,
}

fn repo() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    p.canonicalize().unwrap_or(p)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seconds since midnight of a `2026-11-27T05:07:35.638285Z` log timestamp, and its date.
fn timestamp(s: &str) -> Option<(&str, f64)> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut p = time.split(':').map(|x| x.parse::<f64>());
    let (h, m, sec) = (p.next()?.ok()?, p.next()?.ok()?, p.next()?.ok()?);
    Some((date, h * 3600.0 + m * 60.0 + sec))
}

/// The worker log line rank 0 writes after step `n` (workers log every step here).
fn step_mark(n: u64) -> String {
    format!("scfm_worker::trainer::run: train step={n} ")
}

/// Rank 0's mean `padded_len` over its `train` log lines of steps `a + 1 ..= b` (the
/// workers log every step here).
fn mean_padded_len(log: &str, a: u64, b: u64) -> Option<f64> {
    let v: Vec<f64> = (a + 1..=b)
        .map(|n| {
            let mark = step_mark(n);
            let line = log.lines().find(|l| l.contains(&mark))?;
            let (_, rest) = line.split_once(" padded_len=")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .collect::<Option<_>>()?;
    Some(v.iter().sum::<f64>() / v.len() as f64)
}

/// Wall seconds between the log lines of steps `a` and `b` in `log`.
fn step_span(log: &str, a: u64, b: u64) -> Option<f64> {
    let at = |n: u64| {
        let mark = step_mark(n);
        let line = log.lines().find(|l| l.contains(&mark))?;
        timestamp(line.split_whitespace().next()?)
    };
    let ((da, ta), (db, tb)) = (at(a)?, at(b)?);
    // A run crossing midnight (UTC) is shorter than a day.
    Some(if da == db {
        tb - ta
    } else {
        tb + 86_400.0 - ta
    })
}

/// One scfm job with `workers` workers, coordinator and workers each in their own session.
fn run_scfm(s: &Settings, e: &Env, workers: usize, overlap: bool) -> Result<Run> {
    let ckpt = e.dir.join("ckpt");
    let _ = std::fs::remove_dir_all(&ckpt);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let job = e.dir.join(format!("job-{workers}w-{overlap}.yaml"));
    std::fs::write(
        &job,
        format!(
            "run_id: scaling-{workers}w\ndata:\n  path: {data}\nmodel:\n  preset: minimal\n\
             training:\n  seed: 0\n  batch_size: {batch}\n  max_steps: {steps}\n  \
             warmup_steps: {warmup}\n  eval_every: 1000000\n  max_eval_cells: 64\n  \
             log_every: 1\n  threads: 1\n\
             cluster:\n  max_workers: {workers}\n  coordinator: 127.0.0.1:{port}\n  \
             overlap_allreduce: {overlap}\n\
             checkpoint:\n  url: {ckpt}\n  every_steps: 1000000\n  keep_last: 1\n\
             auth:\n  token: scaling-bench\n",
            data = e.data.display(),
            batch = s.batch,
            steps = s.steps,
            warmup = s.warmup,
            ckpt = ckpt.display(),
        ),
    )?;
    let log = |name: &str| e.dir.join(format!("scfm-{workers}w-{overlap}-{name}.log"));
    let mut c = Command::new("setsid");
    c.arg("-w").arg(&e.scfm).arg("launch").arg(&job);
    let mut cmds = vec![(c, log("coordinator"))];
    for i in 0..workers {
        let mut w = Command::new("setsid");
        w.arg("-w")
            .arg(&e.worker)
            .arg("join")
            .args(["--coordinator", &format!("http://127.0.0.1:{port}")])
            .args(["--bind", "127.0.0.1"])
            .env("SCFM_TOKEN", "scaling-bench");
        cmds.push((w, log(&format!("w{i}"))));
    }
    for (c, _) in cmds.iter_mut() {
        c.env("RUST_BACKTRACE", "0").env("RUST_LOG", "info");
    }
    let logs: Vec<PathBuf> = cmds.iter().map(|c| c.1.clone()).collect();
    let load = load_avg();
    let marks = [step_mark(s.warmup), step_mark(s.steps)];
    let cpu = run_logged(cmds, s.timeout, Some([&marks[0], &marks[1]]))?;
    let mut text = String::new();
    for l in &logs {
        text += &std::fs::read_to_string(l)?;
    }
    let span = step_span(&text, s.warmup, s.steps)
        .with_context(|| format!("no `train step=` log lines in {logs:?}"))?;
    let padded_len = mean_padded_len(&text, s.warmup, s.steps)
        .with_context(|| format!("no `padded_len=` in the timed steps' log lines in {logs:?}"))?;
    // The metrics log: one line per step per worker.
    let mut per_step: BTreeMap<u64, Vec<serde_json::Value>> = BTreeMap::new();
    let store = scfm_common::storage::Store::open(ckpt.to_str().context("checkpoint path")?)?;
    let lines = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(scfm_common::metrics_log::read_effective(&store))?
        .unwrap_or_default();
    for v in lines {
        if let Some(n) = v["step"].as_u64()
            && v["event"] == "step"
            && n > s.warmup
            && n <= s.steps
        {
            per_step.entry(n).or_default().push(v);
        }
    }
    let timed = s.steps - s.warmup;
    if per_step.len() as u64 != timed || per_step.values().any(|v| v.len() != workers) {
        bail!("the metrics log misses steps; see {logs:?}");
    }
    let (mut step_max, mut ar, mut wait) = (0.0, 0.0, 0.0);
    for ws in per_step.values() {
        let f = |k: &str| -> Vec<f64> {
            ws.iter()
                .map(|v| v[k].as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        step_max += f("step_s").into_iter().fold(0.0, f64::max);
        ar += f("allreduce_s").iter().sum::<f64>() / workers as f64;
        wait += f("data_wait_s").iter().sum::<f64>() / workers as f64;
    }
    let timed = timed as f64;
    Ok(Run {
        cells_per_s: (workers * s.batch) as f64 * timed / span,
        step_ms: 1e3 * span / timed,
        metric_step_ms: 1e3 * step_max / timed,
        allreduce_ms: 1e3 * ar / timed,
        data_wait_ms: 1e3 * wait / timed,
        padded_len,
        cpu,
        load,
    })
}

/// `torchrun --standalone --nproc-per-node procs benches/ddp_train.py`.
fn run_ddp(s: &Settings, e: &Env, procs: usize) -> Result<Run> {
    let log = e.dir.join(format!("ddp-{procs}p.log"));
    let load = load_avg();
    let mut cmd = Command::new(&e.python);
    cmd.args(["-m", "torch.distributed.run", "--standalone"])
        .args(["--nproc-per-node", &procs.to_string()])
        .arg(repo().join("benches/ddp_train.py"))
        .arg("--prepared")
        .arg(&e.data)
        .arg("--preset")
        .arg(repo().join("configs/models/minimal.yaml"))
        .args(["--batch", &s.batch.to_string()])
        .args(["--steps", &s.steps.to_string()])
        .args(["--warmup", &s.warmup.to_string()])
        .args(["--variant", &s.ddp_variant])
        .args(["--threads", "1"])
        .env("OMP_NUM_THREADS", "1");
    let marks = Some(["timing: start", "timing: end"]);
    let cpu = run_logged(vec![(cmd, log.clone())], s.timeout, marks)?;
    let text = std::fs::read_to_string(&log)?;
    let v: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .with_context(|| format!("no JSON result in {}", log.display()))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Run {
        cells_per_s: f("cells_per_s"),
        step_ms: f("step_ms"),
        metric_step_ms: f64::NAN,
        allreduce_ms: if procs > 1 {
            f("allreduce_ms_standalone")
        } else {
            0.0
        },
        data_wait_ms: f64::NAN,
        padded_len: v["padded_len"]["mean"].as_f64().unwrap_or(f64::NAN),
        cpu,
        load,
    })
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut s: Vec<f64> = v.collect();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// `v` with `prec` decimals, or a dash when not measured.
fn num(v: f64, prec: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.prec$}")
    }
}

/// What runs a configuration.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// scfm with the gradient all-reduce overlapped with the backward pass (the default).
    Scfm,
    /// scfm with `cluster.overlap_allreduce: false`: one all-reduce after the backward pass.
    ScfmFlat,
    /// PyTorch DDP.
    Ddp,
}

/// The runs: label, scfm workers or DDP processes, side.
const CONFIGS: [(&str, usize, Side); 5] = [
    ("scfm 1w", 1, Side::Scfm),
    ("scfm 2w", 2, Side::Scfm),
    ("DDP 1p", 1, Side::Ddp),
    ("DDP 2p", 2, Side::Ddp),
    ("scfm 2w flat", 2, Side::ScfmFlat),
];

fn main() -> Result<()> {
    let s = Settings {
        rounds: env_or("SCFM_BENCH_ROUNDS", 5),
        ddp_variant: std::env::var("SCFM_BENCH_DDP_VARIANT").unwrap_or_else(|_| "tuned".into()),
        max_spread: env_or("SCFM_BENCH_MAX_SPREAD", 0.25),
        steps: env_or("SCFM_BENCH_STEPS", 130),
        warmup: env_or("SCFM_BENCH_WARMUP", 10),
        batch: env_or("SCFM_BENCH_BATCH", 32),
        timeout: Duration::from_secs(env_or("SCFM_BENCH_TIMEOUT_S", 600)),
    };
    if s.warmup == 0 || s.warmup >= s.steps {
        bail!("SCFM_BENCH_WARMUP must be between 1 and SCFM_BENCH_STEPS - 1");
    }
    let scfm = PathBuf::from(env!("CARGO_BIN_EXE_scfm"));
    let tmp = tempfile::Builder::new().prefix("scfm-scaling").tempdir()?;
    let e = Env {
        worker: scfm.with_file_name("scfm-worker"),
        scfm,
        python: std::env::var_os("SCFM_PYTHON")
            .map_or_else(|| repo().join(".venv/bin/python"), PathBuf::from),
        data: tmp.path().join("prepared"),
        dir: tmp.path().to_path_buf(),
    };
    if !e.worker.is_file() {
        bail!(
            "{} is missing: `cargo build --release --workspace`",
            e.worker.display()
        );
    }
    let mut prepare = Command::new(&e.scfm);
    prepare
        .arg("prepare")
        .arg(repo().join("data/mouse10k.h5ad"))
        .arg("--out")
        .arg(&e.data)
        .arg("--settings")
        .arg(repo().join("configs/prepare-demo.yaml"));
    run_logged(
        vec![(prepare, e.dir.join("prepare.log"))],
        Duration::from_secs(300),
        None,
    )?;
    println!(
        "cargo bench -p scfm-coordinator --bench scaling\n`minimal` preset, demo data, {} cells \
         x 2 views per worker per step, 1 intra-op thread per worker, {} steps, first {} \
         untimed, {} interleaved rounds, {} CPUs; python {}",
        s.batch,
        s.steps,
        s.warmup,
        s.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        e.python.display(),
    );
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..s.rounds {
        // Alternate the order so that drifting machine load hits all alike.
        let mut order: Vec<usize> = (0..CONFIGS.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (label, n, side) = CONFIGS[i];
            let r = match side {
                Side::Ddp => run_ddp(&s, &e, n)?,
                Side::Scfm => run_scfm(&s, &e, n, true)?,
                Side::ScfmFlat => run_scfm(&s, &e, n, false)?,
            };
            eprintln!(
                "round {round}: {label:<8} {:7.1} cells/s {:7.1} ms/step (timed steps: {:.2} \
                 cores used, {:.2} wanted; padded length {:.1}; load {:.2})",
                r.cells_per_s,
                r.step_ms,
                r.cpu.cores_used,
                r.cpu.cores_wanted,
                r.padded_len,
                r.load
            );
            runs[i].push(r);
        }
    }
    report(&s, &runs);
    Ok(())
}

/// Prints the tables (medians over rounds; ratios per round and of the medians).
fn report(s: &Settings, runs: &[Vec<Run>]) {
    let med = |i: usize, f: fn(&Run) -> f64| median(runs[i].iter().map(f));
    let cps: Vec<f64> = (0..CONFIGS.len())
        .map(|i| med(i, |r| r.cells_per_s))
        .collect();
    let spread = |i: usize| {
        let v: Vec<f64> = runs[i].iter().map(|r| r.cells_per_s).collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        (lo, hi, (hi - lo) / cps[i])
    };
    println!(
        "\nGlobal cells/s over steps {}..={}:\n\n\
         | run | cells/s per round | median (min–max) | spread |\n|---|---|---|---|",
        s.warmup + 1,
        s.steps
    );
    for (i, (label, ..)) in CONFIGS.iter().enumerate() {
        let per_round: Vec<String> = runs[i]
            .iter()
            .map(|r| format!("{:.1}", r.cells_per_s))
            .collect();
        let (lo, hi, sp) = spread(i);
        println!(
            "| {label} | {} | **{:.1}** ({lo:.1}–{hi:.1}) | {:.0}% |",
            per_round.join(" "),
            cps[i],
            100.0 * sp
        );
    }
    println!("\n| ratio | per round | of medians | target | met |\n|---|---|---|---|---|");
    // Padded tokens per second: the two sides' batches are drawn independently, so their
    // mean padded lengths differ by chance (a few tokens over the timed steps).
    let tokens = |r: &Run| r.cells_per_s * r.padded_len;
    // (numerator, denominator, target, per padded token) as indices into CONFIGS.
    for (a, b, target, per_token) in [
        (1, 0, 1.8, false),
        (3, 2, f64::NAN, false),
        (1, 3, 1.0, false),
        (0, 2, f64::NAN, false),
        (1, 3, f64::NAN, true),
        (0, 2, f64::NAN, true),
        (4, 0, f64::NAN, false),
        (1, 4, f64::NAN, false),
    ] {
        let rate = |r: &Run| if per_token { tokens(r) } else { r.cells_per_s };
        let per_round: Vec<String> = runs[a]
            .iter()
            .zip(&runs[b])
            .map(|(x, y)| format!("{:.2}", rate(x) / rate(y)))
            .collect();
        let ratio = median(runs[a].iter().map(rate)) / median(runs[b].iter().map(rate));
        let wide: Vec<String> = [a, b]
            .iter()
            .filter(|&&i| spread(i).2.is_nan() || spread(i).2 > s.max_spread)
            .map(|&i| format!("{} spread {:.0}%", CONFIGS[i].0, 100.0 * spread(i).2))
            .collect();
        let shown = if wide.is_empty() {
            format!("**{ratio:.2}×**")
        } else {
            format!(
                "no ratio: {} > {:.0}%",
                wide.join(", "),
                100.0 * s.max_spread
            )
        };
        let (target, met) = match target {
            t if t.is_nan() => (String::new(), ""),
            _ if !wide.is_empty() => (format!("≥ {target}×"), "not measured"),
            t => (format!("≥ {t}×"), if ratio >= t { "yes" } else { "no" }),
        };
        println!(
            "| {} / {}{} | {} | {shown} | {target} | {met} |",
            CONFIGS[a].0,
            CONFIGS[b].0,
            if per_token { ", per padded token" } else { "" },
            per_round.join(" ")
        );
    }
    println!(
        "\nPer timed step (medians over rounds): wall ms; scfm's slowest-worker step_s \
         (metrics log); all-reduce (scfm: gradient ring all-reduce; DDP: standalone gloo \
         all-reduce of the gradient's size); data wait; CPUs the run's threads ran on (used) \
         and were runnable for (wanted), and cells per CPU-second (cells/s / cores used: flat \
         from 1 to 2 workers when only the CPU share limits scaling); rank 0's tokens per \
         sequence as padded (mean over the timed steps); load average at the start.\n\n\
         | run | wall ms | step_s ms | all-reduce ms | data wait ms | cores used | cores wanted \
         | cells per CPU-s | padded len | load |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for (i, (label, ..)) in CONFIGS.iter().enumerate() {
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            num(med(i, |r| r.step_ms), 1),
            num(med(i, |r| r.metric_step_ms), 1),
            num(med(i, |r| r.allreduce_ms), 2),
            num(med(i, |r| r.data_wait_ms), 2),
            num(med(i, |r| r.cpu.cores_used), 2),
            num(med(i, |r| r.cpu.cores_wanted), 2),
            num(med(i, |r| r.cells_per_s / r.cpu.cores_used), 1),
            num(med(i, |r| r.padded_len), 1),
            num(med(i, |r| r.load), 2),
        );
    }
}
