//! The worker's one tokio runtime and its control handle, with real processes on
//! 127.0.0.1: a training cluster worker runs the threads of one runtime (named
//! `scfm-rt`, no other runtime's), and a worker that the coordinator dropped leaves
//! through its normal shutdown with exit code 3 (it used to `process::exit` from the
//! heartbeat task).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use scfm_tests::{TINY, bin, launch_coordinator, wait_exit, wait_log, write_manifest};

/// The names of the threads of process `pid`, with how many carry each.
fn thread_names(pid: u32) -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        if let Ok(c) = std::fs::read_to_string(e.unwrap().path().join("comm")) {
            *names.entry(c.trim_end().to_string()).or_insert(0) += 1;
        }
    }
    names
}

/// Sends `sig` (`STOP`, `CONT`) to `pid`.
fn signal(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn a_dropped_worker_exits_3_through_its_normal_shutdown_on_one_runtime() {
    if !cfg!(target_os = "linux") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let m = write_manifest(
        dir.path(),
        &ckpt,
        TINY,
        "  batch_size: 16\n  max_steps: 100000\n  threads: 1\n  log_every: 10\n  eval_every: 100000",
        "  min_workers: 1\n  max_workers: 1\n  heartbeat_ms: 200",
    );
    // Heartbeat silence of 3 s loses a worker.
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("worker_timeout_s: 20", "worker_timeout_s: 3");
    std::fs::write(&m, text).unwrap();
    let (mut coord, addr, log) = launch_coordinator(&m);
    let wlog = dir.path().join("worker.log");
    let mut w = Command::new(bin("scfm-worker"))
        .args(["join", "--coordinator", &format!("http://{addr}")])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&wlog).unwrap())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    wait_log(&log, &mut seen, "train step=10 ", Duration::from_secs(180));

    // Training, after storage calls (the data, the metrics stream): one runtime's threads.
    let names = thread_names(w.id());
    eprintln!("worker threads while training: {names:?}");
    assert!(names.get("scfm-rt").is_some_and(|&n| n >= 1), "{names:?}");
    for other in ["tokio-runtime-w", "scfm-store-io"] {
        assert!(!names.contains_key(other), "a second runtime: {names:?}");
    }

    // Silent past the heartbeat timeout: the coordinator drops the worker; resumed, the
    // worker hears so and leaves through its normal shutdown.
    signal("STOP", w.id());
    wait_log(
        &log,
        &mut seen,
        "no heartbeat for 3 s",
        Duration::from_secs(60),
    );
    signal("CONT", w.id());
    let status = wait_exit(&mut w, Duration::from_secs(60), "worker");
    let _ = coord.kill();
    let _ = coord.wait();
    let text = std::fs::read_to_string(&wlog).unwrap();
    assert_eq!(status.code(), Some(3), "{text}");
    assert!(
        text.contains("the coordinator dropped this worker"),
        "{text}"
    );
    assert!(
        text.contains("the job ended for this worker: shut down"),
        "{text}"
    );
    assert!(
        text.contains("worker stopped: the coordinator dropped this worker"),
        "{text}"
    );
}
