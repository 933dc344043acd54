//! Elastic membership with real processes on 127.0.0.1: a worker SIGKILLed mid-epoch, the
//! survivors re-form and finish the epoch, a new worker joins and receives the state from
//! a peer; the coordinator's accounting (its metrics log) shows every cell of the epoch
//! consumed exactly once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use scfm_tests::{
    TINY, accounting, bin, generations, launch_coordinator, metric_steps, wait_exit, wait_log,
    write_manifest,
};

/// The manifest of an elastic job (2 to 3 workers, 16 cells per worker and step, the tiny
/// model) with `length` (`epochs` or `max_steps`); returns the checkpoint dir and manifest.
fn elastic_job(dir: &Path, length: &str) -> (PathBuf, PathBuf) {
    let ckpt = dir.join("ckpt");
    let training =
        format!("  batch_size: 16\n{length}\n  threads: 1\n  log_every: 10\n  eval_every: 100000");
    let m = write_manifest(
        dir,
        &ckpt,
        TINY,
        &training,
        "  min_workers: 2\n  max_workers: 3\n  heartbeat_ms: 200",
    );
    (ckpt, m)
}

/// A worker process whose log goes to `log`.
fn worker(addr: &str, log: &Path) -> Child {
    Command::new(bin("scfm-worker"))
        .args(["join", "--coordinator", &format!("http://{addr}")])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn a_killed_worker_is_replaced_by_a_new_generation_and_every_cell_is_used_once() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, m) = elastic_job(dir.path(), "  epochs: 1");
    let (mut coord, addr, log) = launch_coordinator(&m);
    let mut seen = Vec::new();
    let wlog = |i: usize| dir.path().join(format!("w{i}.log"));
    let mut ws: Vec<Child> = (0..3).map(|i| worker(&addr, &wlog(i))).collect();
    wait_log(&log, &mut seen, "train step=30 ", Duration::from_secs(180));
    // SIGKILL one worker mid-epoch: the other two go on as generation 2.
    let mut dead = ws.remove(1);
    dead.kill().unwrap();
    let _ = dead.wait();
    wait_log(
        &log,
        &mut seen,
        "first step of the new generation",
        Duration::from_secs(60),
    );
    // A new worker joins: generation 3 with three workers, the joiner gets a peer's state.
    std::thread::sleep(Duration::from_secs(2));
    ws.push(worker(&addr, &wlog(3)));
    wait_log(&log, &mut seen, "worker joined", Duration::from_secs(60));
    let status = wait_exit(&mut coord, Duration::from_secs(600), "coordinator");
    seen.extend(log.try_iter());
    let text = seen.join("\n");
    let worker_logs: Vec<String> = (0..4)
        .map(|i| std::fs::read_to_string(wlog(i)).unwrap_or_default())
        .collect();
    assert!(status.success(), "{text}\n{}", worker_logs.join("\n"));
    for w in &mut ws {
        let s = wait_exit(w, Duration::from_secs(60), "worker");
        assert!(s.success(), "worker exit {s}");
    }

    let lines = metric_steps(&ckpt);
    let generations = generations(&lines);
    assert_eq!(generations, vec![(2, 2), (3, 3)], "{text}");
    let recovered: Vec<f64> = lines
        .iter()
        .filter(|l| l["event"] == "recovered")
        .map(|l| l["seconds"].as_f64().unwrap())
        .collect();
    assert_eq!(recovered.len(), 2, "{lines:?}");
    eprintln!("first step of a new generation after: {recovered:?} s");

    let (steps, mgem, worlds) = accounting(&lines, 16);
    let last = *steps.keys().last().unwrap();
    let next = steps[&last].0 + steps[&last].1;
    assert_eq!(worlds, BTreeSet::from([2, 3]));
    // One epoch: the steps cover the training cells and stop within the last step.
    let n_train = worker_logs[0]
        .lines()
        .find_map(|l| {
            l.split(" train=")
                .nth(1)
                .and_then(|r| r.split(' ').next()?.parse::<u64>().ok())
        })
        .expect("worker 0 logs its training cells");
    assert!(
        next >= n_train && next - steps[&last].1 < n_train,
        "{next} vs {n_train}"
    );
    // The joiner took the state from a peer.
    assert!(
        worker_logs[3].contains("generation state agreed"),
        "{}",
        worker_logs[3]
    );
    // Loss still falls.
    let head: f64 = (1..=10).map(|s| mgem[&s]).sum::<f64>() / 10.0;
    let tail: f64 = (last - 9..=last).map(|s| mgem[&s]).sum::<f64>() / 10.0;
    assert!(tail < head, "mgem {head} -> {tail}");
    assert!(
        ckpt.join(format!("ckpt-{last:09}/model.safetensors"))
            .is_file()
    );
}

/// A worker that hangs (SIGSTOP: its sockets stay open, so no collective fails) is lost
/// when its heartbeats stop for `worker_timeout_s`; the coordinator then tells its peers to
/// abandon the generation, which breaks their ring at once instead of after the
/// collective deadline, and they go on as a new generation.
#[test]
fn a_hung_worker_is_lost_after_the_heartbeat_timeout_and_its_peers_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, m) = elastic_job(dir.path(), "  max_steps: 120");
    // Heartbeat silence of 3 s loses a worker; collectives would wait 60 s.
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("worker_timeout_s: 20", "worker_timeout_s: 3")
        .replace("collective_timeout_s: 20", "collective_timeout_s: 60");
    std::fs::write(&m, text).unwrap();
    let (mut coord, addr, log) = launch_coordinator(&m);
    let mut seen = Vec::new();
    let wlog = |i: usize| dir.path().join(format!("w{i}.log"));
    let mut ws: Vec<Child> = (0..3).map(|i| worker(&addr, &wlog(i))).collect();
    wait_log(&log, &mut seen, "train step=20 ", Duration::from_secs(180));
    let mut hung = ws.remove(2);
    let ok = Command::new("kill")
        .args(["-STOP", &hung.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let t0 = Instant::now();
    wait_log(
        &log,
        &mut seen,
        "first step of the new generation",
        Duration::from_secs(60),
    );
    let took = t0.elapsed();
    hung.kill().unwrap();
    let _ = hung.wait();
    let status = wait_exit(&mut coord, Duration::from_secs(300), "coordinator");
    seen.extend(log.try_iter());
    let text = seen.join("\n");
    assert!(status.success(), "{text}");
    for w in &mut ws {
        let s = wait_exit(w, Duration::from_secs(60), "worker");
        assert!(s.success(), "worker exit {s}");
    }
    assert!(text.contains("no heartbeat for 3 s"), "{text}");
    // Well before the 60 s collective deadline.
    assert!(took < Duration::from_secs(30), "recovered after {took:?}");
    // The coordinator's order reaches the survivors by their heartbeats; the first to act
    // on it shuts its ring sockets, so the other may see its ring break first.
    let survivors: Vec<String> = (0..2)
        .map(|i| std::fs::read_to_string(wlog(i)).unwrap())
        .collect();
    let (abandoned, broke): (Vec<bool>, Vec<bool>) = survivors
        .iter()
        .map(|l| {
            (
                l.contains("abandoning the generation"),
                l.contains("the ring broke"),
            )
        })
        .unzip();
    let each = abandoned.iter().zip(&broke).all(|(a, b)| *a || *b);
    assert!(abandoned.contains(&true) && each, "{survivors:?}");
    let (steps, _, worlds) = accounting(&metric_steps(&ckpt), 16);
    assert_eq!(worlds, BTreeSet::from([2, 3]));
    assert_eq!(*steps.keys().last().unwrap(), 120);
}

/// `scfm local --max-restarts 1`: a worker process SIGKILLed mid-run is lost at once (its
/// exit is seen, no heartbeat timeout), the other goes on alone, and a replacement process
/// joins the generation after with the survivor's state; the run completes.
#[test]
fn scfm_local_replaces_a_killed_worker_process() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, m) = elastic_job(dir.path(), "  max_steps: 400");
    let mut local = Command::new(bin("scfm"))
        .arg("local")
        .arg(&m)
        .args(["--workers", "2", "--max-restarts", "1"])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (log, _r) = scfm_tests::lines(local.stderr.take().unwrap());
    let mut seen = Vec::new();
    wait_log(&log, &mut seen, "train step=20 ", Duration::from_secs(180));
    let out = Command::new("pgrep")
        .args(["-P", &local.id().to_string(), "scfm-worker"])
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(
        Command::new("kill")
            .args(["-KILL", &pids[1]])
            .status()
            .unwrap()
            .success()
    );
    let status = wait_exit(&mut local, Duration::from_secs(300), "scfm local");
    seen.extend(log.try_iter());
    let text = seen.join("\n");
    assert!(status.success(), "{text}");
    assert!(
        text.contains("starting a worker process in place of"),
        "{text}"
    );
    let lines = metric_steps(&ckpt);
    let generations = generations(&lines);
    // Lost (1 left), then the replacement joined (2 again). The replacement may already
    // have registered when the loss was noticed, making one generation of 2 directly.
    assert!(
        generations == vec![(2, 1), (3, 2)] || generations == vec![(2, 2)],
        "{generations:?}\n{text}"
    );
    eprintln!("generations: {generations:?}");
    let (steps, _, _) = accounting(&lines, 16);
    assert_eq!(*steps.keys().last().unwrap(), 400);
    // Each worker's lines carry the id the coordinator gave it (the replacement is the
    // third to register), and the coordinator names each worker's host.
    for id in ["w0000", "w0001", "w0002"] {
        assert!(text.contains(&format!("[{id}] ")), "no [{id}] line\n{text}");
    }
    assert!(!text.contains("[w0] ") && !text.contains("[w2] "), "{text}");
    let joined: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("worker joined"))
        .collect();
    assert_eq!(joined.len(), 3, "{text}");
    for l in joined {
        assert!(l.contains("host=") && !l.contains("host= "), "{l}");
    }
    // The replacement says it took a member's state, not that it resumed a checkpoint.
    let replacement: Vec<&str> = text.lines().filter(|l| l.starts_with("[w0002] ")).collect();
    assert!(
        replacement
            .iter()
            .any(|l| l.contains("took the state of rank")),
        "{replacement:#?}"
    );
    assert!(
        !replacement.iter().any(|l| l.contains("resumed from")),
        "{replacement:#?}"
    );
}
