//! `cargo bench -p scfm-coordinator --bench scaling`: data-parallel scaling of scfm, 1
//! worker vs 2 workers, side by side with the same model under PyTorch DDP (gloo), 1 vs
//! 2 processes, in one run, interleaved over rounds.
//!
//! Needs `scfm-worker` built next to `scfm` (`cargo build --release -p scfm-worker` with
//! the same `CARGO_TARGET_DIR`; `scfm local` starts it from there) and the project's
//! Python with torch (`SCFM_PYTHON`, else `.venv/bin/python`).
//!
//! - **scfm**: `scfm local JOB --workers W` on the demo dataset (`data/mouse10k.h5ad`
//!   prepared by `scfm prepare --settings configs/prepare-demo.yaml` into a temp dir),
//!   `minimal` preset, `training.threads: 1`, `batch_size` cells per worker, `max_steps`
//!   steps; no evaluation and no checkpoint before the last step. Throughput = global cells
//!   over the wall time from the end of step `warmup` to the end of the last step, taken
//!   from the timestamps of rank 0's `train step=N` log lines (so data wait, all-reduce,
//!   the other collectives and the loop's overhead all count). The coordinator's
//!   `metrics.jsonl` gives the breakdown per step: `step_s` (slowest worker), `allreduce_s`
//!   and `data_wait_s` (means over workers).
//! - **scfm, own sessions**: the same job as `scfm launch JOB` plus W `scfm-worker join`
//!   processes started by this benchmark, each under `setsid` (as torchrun starts its
//!   workers: `start_new_session=True`). Linux's autogroup scheduling shares the CPUs
//!   between sessions first, so on a busy machine the workers of `scfm local` (one
//!   session) compete for one session's share while torchrun's get one share each.
//!   `SCFM_BENCH_SESSIONS=0` skips these runs.
//! - **PyTorch DDP**: `python -m torch.distributed.run --standalone --nproc-per-node P
//!   benches/ddp_train.py` (same preset, same vocabulary, the same per-rank batch shapes
//!   drawn from the same prepared dataset, 1 intra-op thread per process, same steps and
//!   warm-up); the script reports global cells/s over the same steps.
//!
//! Every child runs with a deadline; on timeout or failure the children and their
//! descendants are killed (by pid). Per run: CPU seconds of the process trees
//! (`/proc/self/stat` cutime + cstime) and, over the timed steps, the CPUs their threads
//! ran on and were runnable for (`/proc/PID/task/TID/schedstat`, sampled every 200 ms):
//! the direct measure of CPU contention on a shared machine.
//! Settings from the environment: `SCFM_BENCH_ROUNDS` (3), `SCFM_BENCH_STEPS` (60),
//! `SCFM_BENCH_WARMUP` (10), `SCFM_BENCH_BATCH` (32), `SCFM_BENCH_TIMEOUT_S` (600),
//! `SCFM_BENCH_SESSIONS` (1).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Benchmark settings (see the module doc for the environment variables).
struct Settings {
    rounds: usize,
    steps: u64,
    warmup: u64,
    batch: usize,
    timeout: Duration,
}

/// One measured run.
#[derive(Default, Clone)]
struct Run {
    /// Global cells per second over the steady-state steps (wall clock).
    cells_per_s: f64,
    /// Wall milliseconds per steady-state step.
    step_ms: f64,
    /// scfm: mean over steps of the slowest worker's `step_s` (metrics.jsonl), in ms.
    metric_step_ms: f64,
    /// scfm: gradient all-reduce ms per step; DDP: a standalone gloo all-reduce of the
    /// same size.
    allreduce_ms: f64,
    /// scfm: data wait ms per step (DDP: 0, batches are made before timing).
    data_wait_ms: f64,
    /// DDP: mean padded sequence length of the timed batches (rank 0).
    padded_len: f64,
    /// CPU seconds of the whole child process tree (start-up included).
    cpu_s: f64,
    /// Timed steps: CPUs the process tree's threads ran on, on average.
    cores_used: f64,
    /// Timed steps: CPUs they were runnable for (running or waiting for a CPU), on average.
    cores_wanted: f64,
    /// Wall seconds of the whole command.
    wall_s: f64,
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

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// CPU seconds of this process's waited-for children (cutime + cstime, 100 ticks/s).
fn children_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some(pos) = stat.rfind(')') else {
        return f64::NAN;
    };
    let f: Vec<&str> = stat[pos + 2..].split_whitespace().collect();
    // Fields 16 and 17 of stat (cutime, cstime) are 13 and 14 after the command name.
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(13) + t(14)) / 100.0
}

/// `(pid, parent pid)` of every process.
fn processes() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid = stat[stat.rfind(')')? + 2..].split_whitespace().nth(1)?;
        Some((pid, ppid.parse().ok()?))
    })
    .collect()
}

/// `root` and all its live descendants, parents first.
fn tree(root: u32) -> Vec<u32> {
    let all = processes();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(all.iter().filter(|&&(_, pp)| pp == p).map(|&(c, _)| c));
        i += 1;
    }
    out
}

/// Scheduler time of every thread of a process tree seen so far, from
/// `/proc/PID/task/TID/schedstat`: `(on-CPU ns, runnable-but-waiting ns)` per thread.
#[derive(Default)]
struct Sched(BTreeMap<(u32, u32), (u64, u64)>);

impl Sched {
    fn sample(&mut self, pids: &[u32]) {
        for &pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                let path = format!("/proc/{pid}/task/{tid}/schedstat");
                let Ok(text) = std::fs::read_to_string(path) else {
                    continue;
                };
                let v: Vec<u64> = text
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if v.len() >= 2 {
                    self.0.insert((pid, tid), (v[0], v[1]));
                }
            }
        }
    }

    /// `(on-CPU s, waiting-for-a-CPU s)` summed over the threads.
    fn totals(&self) -> (f64, f64) {
        let (r, w) = self.0.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
        (r as f64 * 1e-9, w as f64 * 1e-9)
    }
}

/// What `run_logged` measured.
struct Finished {
    wall_s: f64,
    /// CPU seconds of the waited-for process trees.
    cpu_s: f64,
    /// Between the two marks: `(wall s, on-CPU s, runnable-but-waiting s)` of the trees'
    /// threads (NaN when a mark never appeared).
    window: (f64, f64, f64),
}

/// A started command: the child, the command (for messages), its log, its exit status.
type Started = (std::process::Child, Command, PathBuf, Option<ExitStatus>);

/// Kills `root` and its descendants (only processes this benchmark started).
fn kill_tree(root: u32) {
    let pids: Vec<String> = tree(root).iter().map(u32::to_string).collect();
    let _ = Command::new("kill").arg("-KILL").args(&pids).status();
}

/// Runs the commands together, each with stdout and stderr to its log, sampling their
/// process trees' scheduler statistics every 200 ms, and snapshots them when the logs
/// first contain `marks[0]`, then `marks[1]` (when given). Fails (killing the others)
/// when one exits unsuccessfully or all have not ended after `timeout`.
fn run_logged(
    cmds: Vec<(Command, PathBuf)>,
    timeout: Duration,
    marks: Option<&[String; 2]>,
) -> Result<Finished> {
    let cpu0 = children_cpu_s();
    let t = Instant::now();
    let mut children: Vec<Started> = Vec::new();
    for (mut cmd, log) in cmds {
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        children.push((child, cmd, log, None::<ExitStatus>));
    }
    let mut sched = Sched::default();
    let mut snaps: Vec<(f64, (f64, f64))> = Vec::new();
    let stop = |children: &mut Vec<Started>| {
        for (c, _, _, done) in children.iter_mut() {
            if done.is_none() {
                kill_tree(c.id());
                let _ = c.wait();
            }
        }
    };
    loop {
        for (c, _, _, done) in children.iter() {
            if done.is_none() {
                sched.sample(&tree(c.id()));
            }
        }
        if let Some(mark) = marks.and_then(|m| m.get(snaps.len()))
            && children.iter().any(|(_, _, log, _)| {
                std::fs::read_to_string(log).is_ok_and(|l| l.contains(mark.as_str()))
            })
        {
            snaps.push((t.elapsed().as_secs_f64(), sched.totals()));
        }
        let mut failed = None;
        for (c, cmd, log, done) in children.iter_mut() {
            if done.is_none() {
                *done = c.try_wait()?;
                if done.is_some_and(|s| !s.success()) {
                    failed = Some(format!("{cmd:?}: {}\n{}", done.unwrap(), tail(log)));
                }
            }
        }
        if let Some(f) = failed {
            stop(&mut children);
            bail!("{f}");
        }
        if children.iter().all(|c| c.3.is_some()) {
            break;
        }
        if t.elapsed() > timeout {
            stop(&mut children);
            let logs: Vec<String> = children.iter().map(|c| tail(&c.2)).collect();
            bail!("timed out after {timeout:?}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let window = match snaps[..] {
        [(t0, (c0, w0)), (t1, (c1, w1))] => (t1 - t0, c1 - c0, w1 - w0),
        _ => (f64::NAN, f64::NAN, f64::NAN),
    };
    Ok(Finished {
        wall_s: t.elapsed().as_secs_f64(),
        cpu_s: children_cpu_s() - cpu0,
        window,
    })
}

/// The last lines of a log, for error messages; the whole log is kept as
/// `$TMPDIR/scfm-scaling-failed-NAME` (the run's temp dir is removed).
fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let kept = std::env::temp_dir().join(format!(
        "scfm-scaling-failed-{}",
        log.file_name().and_then(|n| n.to_str()).unwrap_or("log")
    ));
    let _ = std::fs::write(&kept, &s);
    let lines: Vec<&str> = s.lines().collect();
    format!(
        "{}\n(whole log: {})",
        lines[lines.len().saturating_sub(40)..].join("\n"),
        kept.display()
    )
}

/// Seconds since midnight of a `2026-11-27T05:07:35.638285Z` timestamp, plus its date.
fn timestamp(s: &str) -> Option<(&str, f64)> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut p = time.split(':');
    let h: f64 = p.next()?.parse().ok()?;
    let m: f64 = p.next()?.parse().ok()?;
    let sec: f64 = p.next()?.parse().ok()?;
    Some((date, h * 3600.0 + m * 60.0 + sec))
}

/// Wall seconds between rank 0's `train step=a` and `train step=b` log lines in `log`.
fn step_span(log: &str, a: u64, b: u64) -> Option<f64> {
    let at = |n: u64| {
        let needle = format!("scfm_worker::trainer: train step={n} ");
        log.lines().find_map(|l| {
            // `scfm local` prefixes worker lines with `[wN] `.
            let rest = l
                .strip_prefix("[w")
                .and_then(|r| r.split_once("] "))
                .map_or(l, |r| r.1);
            if !rest.contains(&needle) {
                return None;
            }
            timestamp(rest.split_whitespace().next()?)
        })
    };
    let ((da, ta), (db, tb)) = (at(a)?, at(b)?);
    // A run crossing midnight (UTC) is shorter than a day.
    Some(if da == db {
        tb - ta
    } else {
        tb + 86_400.0 - ta
    })
}

/// What a run measures: scfm (`scfm local`, or coordinator and workers in their own
/// sessions) with W workers, or PyTorch DDP with P processes.
#[derive(Clone, Copy)]
enum Kind {
    Scfm { workers: usize, sessions: bool },
    Ddp { procs: usize },
}

/// Paths the runs need.
struct Env {
    scfm: PathBuf,
    worker: PathBuf,
    python: PathBuf,
    data: PathBuf,
    dir: PathBuf,
}

/// A free port on 127.0.0.1 (for a coordinator started by this benchmark).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One scfm job with `workers` workers; returns the measured run.
fn run_scfm(s: &Settings, e: &Env, workers: usize, sessions: bool) -> Result<Run> {
    let ckpt = e.dir.join("ckpt");
    let _ = std::fs::remove_dir_all(&ckpt);
    let port = free_port()?;
    let manifest = format!(
        "run_id: scaling-{workers}w\ndata:\n  path: {}\nmodel:\n  preset: minimal\n\
         training:\n  seed: 0\n  batch_size: {}\n  max_steps: {}\n  warmup_steps: {}\n  \
         eval_every: 1000000\n  max_eval_cells: 64\n  log_every: {}\n  threads: 1\n\
         cluster:\n  max_workers: {workers}\n  coordinator: 127.0.0.1:{port}\n\
         checkpoint:\n  url: {}\n  every_steps: 1000000\n  keep_last: 1\n\
         auth:\n  token: scaling-bench\n",
        e.data.display(),
        s.batch,
        s.steps,
        s.warmup,
        gcd(s.warmup, s.steps),
        ckpt.display()
    );
    let job = e.dir.join(format!("job-{workers}w.yaml"));
    std::fs::write(&job, manifest)?;
    let tag = if sessions { "sessions" } else { "local" };
    let log = |name: &str| e.dir.join(format!("scfm-{workers}w-{tag}-{name}.log"));
    let mut cmds = Vec::new();
    if sessions {
        let mut c = Command::new("setsid");
        c.arg("-w").arg(&e.scfm).arg("launch").arg(&job);
        cmds.push((c, log("coordinator")));
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
    } else {
        let mut c = Command::new(&e.scfm);
        c.arg("local")
            .arg(&job)
            .args(["--workers", &workers.to_string()]);
        cmds.push((c, log("all")));
    }
    for (c, _) in cmds.iter_mut() {
        c.env("RUST_BACKTRACE", "0").env("RUST_LOG", "info");
    }
    let logs: Vec<PathBuf> = cmds.iter().map(|c| c.1.clone()).collect();
    let load = load_avg();
    let marks = [s.warmup, s.steps].map(|n| format!("scfm_worker::trainer: train step={n} "));
    let fin = run_logged(cmds, s.timeout, Some(&marks))?;
    let mut text = String::new();
    for l in &logs {
        text += &std::fs::read_to_string(l)?;
    }
    let span = step_span(&text, s.warmup, s.steps)
        .with_context(|| format!("no `train step=` log lines in {logs:?}"))?;
    let timed = (s.steps - s.warmup) as f64;
    let cells = (workers * s.batch) as f64;
    // metrics.jsonl: per step, per worker.
    let mut per_step: BTreeMap<u64, Vec<serde_json::Value>> = BTreeMap::new();
    for l in std::fs::read_to_string(ckpt.join("metrics.jsonl"))?.lines() {
        let v: serde_json::Value = serde_json::from_str(l)?;
        match v["step"].as_u64() {
            Some(n) if v["event"] == "step" && n > s.warmup && n <= s.steps => {
                per_step.entry(n).or_default().push(v)
            }
            _ => {}
        }
    }
    if per_step.len() as u64 != s.steps - s.warmup || per_step.values().any(|v| v.len() != workers)
    {
        bail!("metrics.jsonl misses steps; see {logs:?}");
    }
    let (mut step_max, mut ar, mut wait) = (0.0, 0.0, 0.0);
    for ws in per_step.values() {
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        step_max += ws.iter().map(|v| f(v, "step_s")).fold(0.0, f64::max);
        ar += ws.iter().map(|v| f(v, "allreduce_s")).sum::<f64>() / workers as f64;
        wait += ws.iter().map(|v| f(v, "data_wait_s")).sum::<f64>() / workers as f64;
    }
    Ok(Run {
        cells_per_s: cells * timed / span,
        step_ms: 1e3 * span / timed,
        metric_step_ms: 1e3 * step_max / timed,
        allreduce_ms: 1e3 * ar / timed,
        data_wait_ms: 1e3 * wait / timed,
        padded_len: f64::NAN,
        cpu_s: fin.cpu_s,
        cores_used: fin.window.1 / fin.window.0,
        cores_wanted: (fin.window.1 + fin.window.2) / fin.window.0,
        wall_s: fin.wall_s,
        load,
    })
}

/// `torchrun --nproc-per-node procs benches/ddp_train.py`; returns the measured run.
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
        .args(["--threads", "1"])
        .env("OMP_NUM_THREADS", "1");
    let marks = ["timing: start".to_string(), "timing: end".to_string()];
    let fin = run_logged(vec![(cmd, log.clone())], s.timeout, Some(&marks))?;
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
        data_wait_ms: 0.0,
        padded_len: v["padded_len"]["mean"].as_f64().unwrap_or(f64::NAN),
        cpu_s: fin.cpu_s,
        cores_used: fin.window.1 / fin.window.0,
        cores_wanted: (fin.window.1 + fin.window.2) / fin.window.0,
        wall_s: fin.wall_s,
        load,
    })
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a.max(1) } else { gcd(b, a % b) }
}

/// `v` with `prec` decimals, or a dash when not measured.
fn num(v: f64, prec: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.prec$}")
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

fn main() -> Result<()> {
    println!("command: cargo bench -p scfm-coordinator --bench scaling");
    let s = Settings {
        rounds: env_or("SCFM_BENCH_ROUNDS", 3),
        steps: env_or("SCFM_BENCH_STEPS", 60),
        warmup: env_or("SCFM_BENCH_WARMUP", 10),
        batch: env_or("SCFM_BENCH_BATCH", 32),
        timeout: Duration::from_secs(env_or("SCFM_BENCH_TIMEOUT_S", 600)),
    };
    if s.warmup == 0 || s.warmup >= s.steps {
        bail!("SCFM_BENCH_WARMUP must be between 1 and SCFM_BENCH_STEPS - 1");
    }
    let scfm = PathBuf::from(env!("CARGO_BIN_EXE_scfm"));
    let worker = scfm.with_file_name("scfm-worker");
    if !worker.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p scfm-worker` \
             (same CARGO_TARGET_DIR); `scfm local` starts it from there",
            worker.display()
        );
    }
    let python = std::env::var_os("SCFM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    let tmp = tempfile::Builder::new().prefix("scfm-scaling").tempdir()?;
    let e = Env {
        data: tmp.path().join("prepared"),
        dir: tmp.path().to_path_buf(),
        scfm,
        worker,
        python,
    };
    let mut prepare = Command::new(&e.scfm);
    prepare
        .arg("prepare")
        .arg(repo().join("data/mouse10k.h5ad"))
        .arg("--out")
        .arg(&e.data)
        .arg("--settings")
        .arg(repo().join("configs/prepare-demo.yaml"));
    let log = e.dir.join("prepare.log");
    run_logged(vec![(prepare, log)], Duration::from_secs(300), None)?;
    println!(
        "binaries: {} + {}; python: {}\n`minimal` preset, demo data (9,912 cells x 1,000 genes), \
         {} cells x 2 views per worker per step, 1 intra-op thread per worker, {} steps, \
         first {} untimed; {} interleaved rounds; {} CPUs",
        e.scfm.display(),
        e.worker.display(),
        e.python.display(),
        s.batch,
        s.steps,
        s.warmup,
        s.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let mut configs = vec![
        (
            "scfm 1w",
            Kind::Scfm {
                workers: 1,
                sessions: false,
            },
        ),
        (
            "scfm 2w",
            Kind::Scfm {
                workers: 2,
                sessions: false,
            },
        ),
    ];
    if env_or("SCFM_BENCH_SESSIONS", 1) != 0 {
        configs.push((
            "scfm 1w sessions",
            Kind::Scfm {
                workers: 1,
                sessions: true,
            },
        ));
        configs.push((
            "scfm 2w sessions",
            Kind::Scfm {
                workers: 2,
                sessions: true,
            },
        ));
    }
    configs.push(("DDP 1p", Kind::Ddp { procs: 1 }));
    configs.push(("DDP 2p", Kind::Ddp { procs: 2 }));
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); configs.len()];
    for round in 0..s.rounds {
        // Alternate the order so that drifting machine load hits all alike.
        let mut order: Vec<usize> = (0..configs.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (label, kind) = configs[i];
            let r = match kind {
                Kind::Scfm { workers, sessions } => run_scfm(&s, &e, workers, sessions)?,
                Kind::Ddp { procs } => run_ddp(&s, &e, procs)?,
            };
            eprintln!(
                "round {round}: {label:<16} {:7.1} cells/s {:7.1} ms/step (wall {:.1} s, \
                 CPU {:.1} s; timed steps: {:.2} cores used, {:.2} wanted; load {:.2})",
                r.cells_per_s, r.step_ms, r.wall_s, r.cpu_s, r.cores_used, r.cores_wanted, r.load
            );
            runs[i].push(r);
        }
    }
    report(&s, &configs, &runs);
    Ok(())
}

/// Prints the tables (medians over rounds).
fn report(s: &Settings, configs: &[(&str, Kind)], runs: &[Vec<Run>]) {
    let med = |i: usize, f: fn(&Run) -> f64| median(&runs[i].iter().map(f).collect::<Vec<_>>());
    let cps: Vec<f64> = (0..configs.len())
        .map(|i| med(i, |r| r.cells_per_s))
        .collect();
    println!(
        "\nGlobal cells/s over steps {}..{} (median of rounds):",
        s.warmup + 1,
        s.steps
    );
    println!("| run | cells/s per round | median cells/s | ms/step |");
    println!("|---|---|---|---|");
    for (i, (label, _)) in configs.iter().enumerate() {
        let rounds: Vec<String> = runs[i]
            .iter()
            .map(|r| format!("{:.1}", r.cells_per_s))
            .collect();
        println!(
            "| {label} | {} | **{:.1}** | {:.1} |",
            rounds.join(" "),
            cps[i],
            med(i, |r| r.step_ms)
        );
    }
    println!("\n| ratio | per round | of medians | target |");
    println!("|---|---|---|---|");
    let ratios = [
        ("scfm 2w", "scfm 1w", ">= 1.8x"),
        ("scfm 2w sessions", "scfm 1w sessions", ">= 1.8x"),
        ("DDP 2p", "DDP 1p", ""),
        ("scfm 2w", "DDP 2p", ">= 1"),
        ("scfm 2w sessions", "DDP 2p", ">= 1"),
        ("scfm 1w", "DDP 1p", ""),
    ];
    let find = |l: &str| configs.iter().position(|c| c.0 == l);
    for (a, b, target) in ratios {
        let (Some(a_i), Some(b_i)) = (find(a), find(b)) else {
            continue;
        };
        let per_round: Vec<String> = runs[a_i]
            .iter()
            .zip(&runs[b_i])
            .map(|(x, y)| format!("{:.2}", x.cells_per_s / y.cells_per_s))
            .collect();
        println!(
            "| {a} / {b} | {} | **{:.2}x** | {target} |",
            per_round.join(" "),
            cps[a_i] / cps[b_i]
        );
    }
    println!(
        "\nPer step (medians): scfm step_s from metrics.jsonl (slowest worker), all-reduce \
         (scfm: gradient ring all-reduce measured by the workers; DDP: standalone gloo \
         all-reduce of the gradient's size), data wait; during the timed steps, the CPUs \
         all threads of the run ran on (used) and were runnable for (wanted: running or \
         waiting for a CPU), from /proc schedstat sampled every 200 ms, and cells/s per \
         core used (flat from 1 to 2 workers when only CPU share limits scaling); the whole \
         run's CPU s and wall s (start-up included); 1-minute load average at the start."
    );
    println!(
        "| run | wall ms/step | metrics ms/step | all-reduce ms | data wait ms | padded len | \
         cores used | cores wanted | cells/s per core used | CPU s | wall s | load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, (label, _)) in configs.iter().enumerate() {
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            num(med(i, |r| r.step_ms), 1),
            num(med(i, |r| r.metric_step_ms), 1),
            num(med(i, |r| r.allreduce_ms), 2),
            num(med(i, |r| r.data_wait_ms), 3),
            num(med(i, |r| r.padded_len), 1),
            num(med(i, |r| r.cores_used), 2),
            num(med(i, |r| r.cores_wanted), 2),
            num(med(i, |r| r.cells_per_s / r.cores_used), 1),
            num(med(i, |r| r.cpu_s), 1),
            num(med(i, |r| r.wall_s), 1),
            num(med(i, |r| r.load), 2),
        );
    }
}
