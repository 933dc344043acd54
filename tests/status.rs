//! `scfm status` on a real job: `scfm local` with 2 workers on 127.0.0.1 is asked over
//! gRPC while it trains (with the job's token; a wrong or missing token is refused), and
//! its files are read after it finished.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use scfm_tests::{TINY, bin, lines, run_with_timeout, wait_exit, write_manifest};

const STEPS: u64 = 2000;

/// Kills the job if the test fails half-way.
struct Job(std::process::Child);

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(args: &[&str]) -> Output {
    run_with_timeout(
        Command::new(bin("scfm"))
            .arg("status")
            .args(args)
            .env_remove("SCFM_TOKEN")
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(60),
    )
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "scfm status failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

fn finite(v: &serde_json::Value, k: &str) -> f64 {
    let x = v[k]
        .as_f64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"));
    assert!(x.is_finite(), "{k} = {x}");
    x
}

#[test]
fn status_of_a_running_job_over_grpc_and_of_its_files_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let training = format!(
        "  seed: 2\n  batch_size: 8\n  max_steps: {STEPS}\n  eval_every: 500\n  log_every: 50\n  threads: 1"
    );
    let m = write_manifest(
        dir.path(),
        &ckpt,
        TINY,
        &training,
        "  max_workers: 2\n  heartbeat_ms: 200",
    );
    let mut text = std::fs::read_to_string(&m).unwrap();
    text.push_str("auth:\n  token: s3cret\n");
    std::fs::write(&m, text).unwrap();

    let mut job = Job(Command::new(bin("scfm"))
        .arg("local")
        .arg(&m)
        .args(["--workers", "2"])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let (log, _reader) = lines(job.0.stderr.take().unwrap());
    let mut seen = Vec::new();
    let url = loop {
        let line = log
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no coordinator address printed:\n{}", seen.join("\n")));
        if let Some(rest) = line.split("coordinator on ").nth(1) {
            break rest.split(';').next().unwrap().trim().to_string();
        }
        seen.push(line);
    };
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    // A wrong or missing token is refused, naming the coordinator.
    for args in [vec![url.as_str(), "--token", "guess"], vec![url.as_str()]] {
        let o = status(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} was answered");
        assert!(
            err.contains(&url) && err.contains("refused") && err.contains("token"),
            "{err}"
        );
    }

    // While it trains: 2 workers, a generation, finite losses, the planned length.
    let host_port = url.trim_start_matches("http://").to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    let live = loop {
        assert!(
            Instant::now() < deadline,
            "the job never reported a step with 2 workers"
        );
        let o = status(&[&host_port, "--token", "s3cret", "--json"]);
        if o.status.success() {
            let v = json(&o);
            if v["step"].as_u64().unwrap_or(0) > 1 && v["workers_alive"] == 2 {
                break v;
            }
            assert_ne!(
                v["state"], "finished",
                "the job ended before it was seen: {v}"
            );
        } else if job.0.try_wait().unwrap().is_some() {
            panic!(
                "the job ended before it was seen: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("live status: {live}");
    assert_eq!(live["state"], "running", "{live}");
    assert_eq!(live["run_id"], "test");
    assert_eq!(live["world_size"], 2);
    assert!(live["generation"].as_u64().unwrap() >= 1, "{live}");
    assert_eq!(live["total_steps"], STEPS);
    assert!(live["step"].as_u64().unwrap() <= STEPS);
    for k in ["loss", "mgem", "contrastive", "cells_per_s"] {
        finite(&live, k);
    }
    // The human form says the same.
    let o = status(&[&url, "--token", "s3cret"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("job test: ") && text.contains("step ") && text.contains("loss "),
        "{text}"
    );

    let st = wait_exit(&mut job.0, Duration::from_secs(600), "scfm local");
    assert!(st.success(), "scfm local failed");
    // The coordinator is gone: a clear error naming its address, within the deadline.
    let t0 = Instant::now();
    let o = status(&[&url, "--token", "s3cret", "--timeout-s", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&url), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30));

    // From the files: finished at the last step, with its checkpoint.
    let v = json(&status(&[ckpt.to_str().unwrap(), "--json"]));
    eprintln!("file status: {v}");
    assert_eq!(v["state"], "finished", "{v}");
    assert_eq!(v["step"], STEPS);
    assert_eq!(v["total_steps"], STEPS);
    assert_eq!(v["checkpoint"]["step"], STEPS);
    assert!(
        v["checkpoint"]["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/ckpt-{STEPS:09}")),
        "{v}"
    );
    assert!(finite(&v["checkpoint"], "age_s") < 600.0);
    for k in ["loss", "mgem", "contrastive", "val_loss"] {
        finite(&v, k);
    }
    let o = status(&[&format!("file://{}", ckpt.display())]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("finished") && text.contains(&format!("step {STEPS}")),
        "{text}"
    );
}
