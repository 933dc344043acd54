//! `cargo bench -p scfm-coordinator --bench recovery`: how long a cluster needs to get
//! back to training, measured from the coordinator's log on real processes (the built
//! `scfm` and `scfm-worker`, `cargo build --release --workspace` first) training the demo
//! dataset (`data/mouse10k.h5ad`, prepared into a temp dir).
//!
//! 1. **Worker loss** (`scfm launch` + 3 `scfm-worker join`, `min_workers: 2`): one worker
//!    is SIGKILLed at step `SCFM_BENCH_KILL_AT` (20). Reported: kill → the coordinator
//!    losing it (detection), kill → the new generation formed, and kill → its first step
//!    (with the coordinator's own "seconds after the change was noticed"). Target: first
//!    step < 10 s after detection.
//! 2. **Resume** (`scfm local --workers 2`): a run preempted by SIGTERM at step
//!    `SCFM_BENCH_KILL_AT` is relaunched; reported: launch → first step for the resumed run
//!    next to launch → first step of a fresh run of the same job.
//!
//! Model preset from `SCFM_BENCH_PRESET` (`minimal`), 1 intra-op thread per worker, batch
//! 16 per worker. `SCFM_BENCH_ROUNDS` (2) repeats both, interleaved; medians are printed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn repo() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    p.canonicalize().unwrap_or(p)
}

fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    target.join("release").join(name)
}

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Lines of a child's stderr with the time each arrived.
fn stderr_lines(child: &mut Child) -> Receiver<(Instant, String)> {
    let err = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufRead::lines(std::io::BufReader::new(err)).map_while(Result::ok) {
            if tx.send((Instant::now(), l)).is_err() {
                break;
            }
        }
    });
    rx
}

/// When the first line containing `needle` arrived (lines before it are dropped).
fn wait_for(rx: &Receiver<(Instant, String)>, needle: &str, timeout: Duration) -> Result<Instant> {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let (t, l) = rx
            .recv_timeout(left)
            .with_context(|| format!("no `{needle}` in the coordinator log within {timeout:?}"))?;
        if l.contains(needle) {
            return Ok(t);
        }
    }
}

fn manifest(dir: &Path, data: &Path, cluster: &str) -> Result<PathBuf> {
    let preset = std::env::var("SCFM_BENCH_PRESET").unwrap_or_else(|_| "minimal".into());
    let text = format!(
        "run_id: bench-recovery\ndata:\n  path: {}\n  validation_fraction: 0.05\nmodel:\n  preset: {preset}\ntraining:\n  batch_size: 16\n  max_steps: 100000\n  threads: 1\n  log_every: 1\n  eval_every: 100000\ncluster:\n{cluster}\ncheckpoint:\n  url: {}\n  every_steps: 100000\n",
        data.display(),
        dir.join("ckpt").display()
    );
    let p = dir.join("job.yaml");
    std::fs::write(&p, text)?;
    Ok(p)
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Seconds: kill → lost, kill → formed, kill → first step, noticed → first step, and
/// the median step time before the kill.
fn worker_loss(data: &Path, kill_at: u64) -> Result<[f64; 5]> {
    let dir = tempfile::tempdir()?;
    let m = manifest(
        dir.path(),
        data,
        "  min_workers: 2\n  max_workers: 3\n  heartbeat_ms: 500",
    )?;
    let mut coord = Command::new(bin("scfm"))
        .arg("launch")
        .arg(&m)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start scfm launch")?;
    let log = stderr_lines(&mut coord);
    let mut out = String::new();
    {
        use std::io::BufRead;
        std::io::BufReader::new(coord.stdout.take().expect("stdout")).read_line(&mut out)?;
    }
    let addr = out.trim().rsplit(' ').next().unwrap_or("").to_string();
    let mut workers: Vec<Child> = (0..3)
        .map(|_| {
            Command::new(bin("scfm-worker"))
                .args(["join", "--coordinator", &format!("http://{addr}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let r = (|| {
        // Step times from the coordinator's per-step log lines.
        let mut stamps = Vec::new();
        let end = Instant::now() + Duration::from_secs(600);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let (t, l) = log
                .recv_timeout(left)
                .with_context(|| format!("no step {kill_at} within 600 s"))?;
            if l.contains("train step=") {
                stamps.push(t);
            }
            if l.contains(&format!("train step={kill_at} ")) {
                break;
            }
        }
        let step_s = median(
            stamps
                .windows(2)
                .skip(1)
                .map(|w| w[1].duration_since(w[0]).as_secs_f64())
                .collect(),
        );
        let t0 = Instant::now();
        kill(&mut workers[1]);
        let lost = wait_for(&log, "worker lost", Duration::from_secs(120))?;
        let formed = wait_for(&log, "new generation formed", Duration::from_secs(120))?;
        let (first, line) = loop {
            let (t, l) = log.recv_timeout(Duration::from_secs(120))?;
            if l.contains("first step of the new generation") {
                break (t, l);
            }
        };
        let noticed = line
            .split("seconds=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        let s = |t: Instant| t.duration_since(t0).as_secs_f64();
        Ok([s(lost), s(formed), s(first), noticed, step_s])
    })();
    for w in &mut workers {
        kill(w);
    }
    kill(&mut coord);
    r
}

/// Seconds from `scfm local` starting to its first step, fresh and resumed.
fn resume(data: &Path, kill_at: u64) -> Result<[f64; 2]> {
    let dir = tempfile::tempdir()?;
    let m = manifest(dir.path(), data, "  max_workers: 2")?;
    let local = || {
        Command::new(bin("scfm"))
            .arg("local")
            .arg(&m)
            .args(["--workers", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    };
    let t0 = Instant::now();
    let mut first = local()?;
    let log = stderr_lines(&mut first);
    let fresh = wait_for(&log, "train step=1 ", Duration::from_secs(600))?;
    wait_for(
        &log,
        &format!("train step={kill_at} "),
        Duration::from_secs(600),
    )?;
    let ok = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()?
        .success();
    if !ok || !first.wait()?.success() {
        bail!("the preempted run did not exit cleanly");
    }
    let t1 = Instant::now();
    let mut second = local()?;
    let log2 = stderr_lines(&mut second);
    // The first step logged is the first one after the checkpoint.
    let resumed = wait_for(&log2, "train step=", Duration::from_secs(600));
    kill(&mut second);
    let resumed = resumed?;
    Ok([
        fresh.duration_since(t0).as_secs_f64(),
        resumed.duration_since(t1).as_secs_f64(),
    ])
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    for b in ["scfm", "scfm-worker"] {
        if !bin(b).is_file() {
            bail!(
                "{} is missing: cargo build --release --workspace first",
                bin(b).display()
            );
        }
    }
    let kill_at = env_or("SCFM_BENCH_KILL_AT", 20);
    let rounds = env_or("SCFM_BENCH_ROUNDS", 2).max(1);
    let data_dir = tempfile::tempdir()?;
    let data = data_dir.path().join("prepared");
    let st = Command::new(bin("scfm"))
        .arg("prepare")
        .arg(repo().join("data/mouse10k.h5ad"))
        .arg("--out")
        .arg(&data)
        .arg("--settings")
        .arg(repo().join("configs/prepare-demo.yaml"))
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("scfm prepare failed (run scripts/setup.sh for data/mouse10k.h5ad)");
    }
    let (mut loss, mut res) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let l = worker_loss(&data, kill_at)?;
        eprintln!(
            "round {round}: lost after {:.2} s, generation formed after {:.2} s, first step after {:.2} s ({:.2} s after noticed; a step took {:.2} s before)",
            l[0], l[1], l[2], l[3], l[4]
        );
        loss.push(l);
        let r = resume(&data, kill_at)?;
        eprintln!(
            "round {round}: launch -> first step {:.2} s fresh, {:.2} s resumed",
            r[0], r[1]
        );
        res.push(r);
    }
    let col = |v: &[[f64; 5]], i: usize| median(v.iter().map(|x| x[i]).collect());
    let rcol = |v: &[[f64; 2]], i: usize| median(v.iter().map(|x| x[i]).collect());
    println!("worker loss (SIGKILL 1 of 3 at step {kill_at}), medians of {rounds}:");
    println!(
        "| kill → lost | kill → new generation | kill → first step | noticed → first step (target < 10 s) | step before |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s |",
        col(&loss, 0),
        col(&loss, 1),
        col(&loss, 2),
        col(&loss, 3),
        col(&loss, 4)
    );
    println!("launch → first step (scfm local, 2 workers), medians of {rounds}:");
    println!("| fresh | resumed at step {kill_at} | ratio |");
    println!("|---|---|---|");
    let (f, r) = (rcol(&res, 0), rcol(&res, 1));
    println!("| {f:.2} s | {r:.2} s | {:.2} |", r / f);
    Ok(())
}
