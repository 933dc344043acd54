//! Multi-process clusters on 127.0.0.1: `scfm local` starts the coordinator and real
//! `scfm-worker join` processes that train on the real demo dataset, prepared into shards
//! by `scfm prepare`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use scfm_tests::{
    TINY, bin, launch_coordinator, lines, make_certificates, metric_steps, run_with_timeout,
    sigterm, wait_exit, write_manifest,
};

fn local(manifest: &Path, workers: usize) -> String {
    let out = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("local")
            .arg(manifest)
            .args(["--workers", &workers.to_string()])
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(600),
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "scfm local failed:\n{err}");
    err
}

fn read_params(path: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn three_workers_train_and_end_with_identical_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let training = "  seed: 3\n  batch_size: 8\n  max_steps: 80\n  lr: 0.003\n  warmup_steps: 10\n  eval_every: 40\n  log_every: 20\n  threads: 1";
    // The decoder's targets as log1p values: on standardised targets (the preset's) this
    // small model's GEPC loss stays within step-to-step noise for 80 steps (0.444 -> 0.432
    // over the first and last 20 steps), so it could not show that the decoder learns.
    let model = format!("{TINY}\n  gepc_target: log1p");
    let m = write_manifest(
        dir.path(),
        &ckpt,
        &model,
        training,
        "  max_workers: 3\n  checksum_every: 10",
    );
    let err = local(&m, 3);
    let prints: Vec<&str> = err
        .lines()
        .filter_map(|l| l.split("parameter fingerprint ").nth(1))
        .collect();
    assert_eq!(
        prints.len(),
        3,
        "every worker reports its fingerprint:\n{err}"
    );
    assert!(
        prints.iter().all(|p| *p == prints[0]),
        "workers ended with different parameters: {prints:?}"
    );
    // The coordinator's accounting: every step reported by all three workers.
    let lines = metric_steps(&ckpt);
    let mut per_step: HashMap<u64, usize> = HashMap::new();
    for l in &lines {
        *per_step.entry(l["step"].as_u64().unwrap()).or_default() += 1;
    }
    assert_eq!(per_step.len(), 80);
    assert!(
        per_step.values().all(|&n| n == 3),
        "steps missing from the metrics log"
    );
    let mgem = |s: u64| {
        lines.iter().find(|l| l["step"] == s).unwrap()["mgem"]
            .as_f64()
            .unwrap()
    };
    let start = (1..=5).map(mgem).sum::<f64>() / 5.0;
    let end = (76..=80).map(mgem).sum::<f64>() / 5.0;
    eprintln!("3 workers: MGEM {start:.4} -> {end:.4}");
    assert!(end < start - 0.5, "loss did not fall: {start} -> {end}");
    // The preset's (per-gene) GEPC decoder: its loss travels with every step and falls too.
    let gepc = |s: u64| {
        lines.iter().find(|l| l["step"] == s).unwrap()["gepc"]
            .as_f64()
            .unwrap()
    };
    let (g0, g1) = (
        (1..=5).map(gepc).sum::<f64>() / 5.0,
        (76..=80).map(gepc).sum::<f64>() / 5.0,
    );
    eprintln!("3 workers: GEPC {g0:.4} -> {g1:.4}");
    assert!(g0 > 0.0 && g1 < g0, "GEPC did not fall: {g0} -> {g1}");
    assert!(ckpt.join("ckpt-000000080/model.safetensors").exists());
}

/// `cluster.overlap_allreduce` end to end: two workers with the gradient all-reduce
/// overlapped with the backward pass (the default) end with the same parameters, bit for
/// bit, as with one flat all-reduce after it (two ranks add each element once either
/// way), dropout on, 32 rows per batch so that the encoder runs them in groups of similar
/// length (`training.length_groups`; the groups' cuts merge level by level); the
/// overlapped run says so in its log, and every step line reports
/// the all-reduce's time and what the step waited for: all of it without overlap; with
/// it a time of its own (the unhidden part plus the thread hand-off, which on a loaded
/// machine can exceed the all-reduce of this tiny model).
#[test]
fn two_workers_overlapped_all_reduce_equals_the_flat_one_bitwise() {
    let training = "  seed: 11\n  batch_size: 16\n  max_steps: 12\n  eval_every: 100\n  log_every: 4\n  threads: 1";
    let run = |overlap: bool| {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let m = write_manifest(
            dir.path(),
            &ckpt,
            &format!("{TINY}\n  dropout: 0.1"),
            training,
            &format!("  max_workers: 2\n  overlap_allreduce: {overlap}"),
        );
        let err = local(&m, 2);
        let model = std::fs::read(ckpt.join("ckpt-000000012/model.safetensors")).unwrap();
        (dir, model, metric_steps(&ckpt), err)
    };
    let (_a, overlapped, lines, err) = run(true);
    let (_b, flat, flat_lines, flat_err) = run(false);
    assert!(
        err.contains("overlapped with the backward pass"),
        "the default run did not overlap:\n{err}"
    );
    assert!(
        flat_err.contains("after the backward pass (one flat buffer)"),
        "overlap_allreduce: false still overlapped:\n{flat_err}"
    );
    assert!(
        overlapped == flat,
        "overlapped and flat all-reduce ended with different parameters"
    );
    assert_eq!(lines.len(), 24, "12 steps from each of 2 workers");
    assert_eq!(flat_lines.len(), 24);
    let times = |l: &serde_json::Value| {
        (
            l["allreduce_s"].as_f64().unwrap(),
            l["allreduce_wait_s"].as_f64().unwrap(),
        )
    };
    for l in &lines {
        let (busy, wait) = times(l);
        assert!(busy > 0.0 && wait >= 0.0 && wait.is_finite(), "{l}");
    }
    for l in &flat_lines {
        let (busy, wait) = times(l);
        assert!(busy > 0.0 && wait == busy, "{l}");
    }
}

/// Gradient-mean semantics: 2 workers with batch B take the same steps as 1 worker with
/// batch 2B on the same data (dropout off; the loss is defined over the global batch).
/// AdamW's `eps` is set to 1 so that the update is proportional to the gradient: with a
/// tiny eps, Adam turns float-rounding noise in (mathematically) zero gradients into
/// full `lr`-sized steps of either sign, which would test rounding, not the maths.
#[test]
fn two_workers_with_batch_b_equal_one_worker_with_batch_2b() {
    let model = format!("{TINY}\n  dropout: 0.0");
    let common = "  seed: 5\n  max_steps: 6\n  lr: 0.05\n  eps: 1.0\n  warmup_steps: 2\n  eval_every: 100\n  threads: 1";
    let a = tempfile::tempdir().unwrap();
    let ma = write_manifest(
        a.path(),
        &a.path().join("ckpt"),
        &model,
        &format!("{common}\n  batch_size: 8"),
        "  max_workers: 2",
    );
    local(&ma, 2);
    let b = tempfile::tempdir().unwrap();
    let mb = write_manifest(
        b.path(),
        &b.path().join("ckpt"),
        &model,
        &format!("{common}\n  batch_size: 16"),
        "  max_workers: 1",
    );
    local(&mb, 1);
    let pa = read_params(&a.path().join("ckpt/ckpt-000000006/model.safetensors"));
    let pb = read_params(&b.path().join("ckpt/ckpt-000000006/model.safetensors"));
    assert_eq!(pa.len(), pb.len());
    let mut worst = 0f32;
    for (name, va) in &pa {
        let vb = &pb[name];
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("max |param difference| after 6 steps: {worst:e}");
    // Float summation order differs (ring all-reduce, split batches): allow 1e-5.
    assert!(worst < 1e-5, "parameters differ by {worst}");
    // And the reported losses agree step by step.
    let la = metric_steps(&a.path().join("ckpt"));
    let lb = metric_steps(&b.path().join("ckpt"));
    for s in 1..=6u64 {
        let get = |ls: &[serde_json::Value]| {
            ls.iter().find(|l| l["step"] == s).unwrap()["loss"]
                .as_f64()
                .unwrap()
        };
        assert!(
            (get(&la) - get(&lb)).abs() < 1e-5,
            "loss at step {s}: {} vs {}",
            get(&la),
            get(&lb)
        );
    }
}

/// `scfm launch` of an endless job that needs both of its 2 workers (`min_workers` = 2),
/// with the given join timeout: its checkpoint dir, process, address and log lines.
fn two_of_two(
    dir: &Path,
    join_timeout_s: u64,
) -> (
    std::path::PathBuf,
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    let ckpt = dir.join("ckpt");
    let training = "  batch_size: 8\n  max_steps: 100000\n  threads: 1\n  log_every: 5";
    let cluster = format!(
        "  min_workers: 2\n  max_workers: 2\n  heartbeat_ms: 200\n  join_timeout_s: {join_timeout_s}"
    );
    let m = write_manifest(dir, &ckpt, TINY, training, &cluster);
    let (coord, addr, log) = launch_coordinator(&m);
    (ckpt, coord, addr, log)
}

/// A worker SIGKILLed when no other can take its place (min_workers = 2 of 2): the
/// survivor agrees on the state, checkpoints it and waits; nobody returns within the join
/// timeout, so the job fails, naming why, and the checkpoint stays for a relaunch.
#[test]
fn below_min_workers_the_survivor_checkpoints_and_the_job_fails_after_the_join_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, mut coord, addr, log) = two_of_two(dir.path(), 8);
    // No token configured: workers join without one.
    let spawn = || {
        Command::new(bin("scfm-worker"))
            .args(["join", "--coordinator", &format!("http://{addr}")])
            .env("RUST_BACKTRACE", "0")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut w0 = spawn();
    let mut w1 = spawn();
    let mut seen = Vec::new();
    loop {
        let line = log
            .recv_timeout(Duration::from_secs(120))
            .expect("no step 20 logged");
        let done = line.contains("train step=20 ");
        seen.push(line);
        if done {
            break;
        }
    }
    w1.kill().unwrap();
    let _ = w1.wait();
    let status = wait_exit(
        &mut w0,
        Duration::from_secs(90),
        "surviving worker after its peer died",
    );
    assert!(
        !status.success(),
        "the survivor must fail, not hang or succeed"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut w0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("with rank"),
        "the ring names the dead peer:\n{err}"
    );
    assert!(
        err.contains("job failed") || err.contains("coordinator ended the job"),
        "{err}"
    );
    let cstatus = wait_exit(
        &mut coord,
        Duration::from_secs(60),
        "coordinator after a worker died",
    );
    assert!(!cstatus.success());
    seen.extend(log.try_iter());
    let cerr = seen.join("\n");
    assert!(cerr.contains("worker lost"), "{cerr}");
    assert!(
        cerr.contains("fewer than min_workers (2) workers for 8 s"),
        "{cerr}"
    );
    // The holding generation checkpointed the agreed state.
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("latest.json")).unwrap()).unwrap();
    assert!(latest["step"].as_u64().unwrap() >= 20, "{latest}");
}

/// Below min_workers the survivor holds (state checkpointed, waiting for workers); a
/// SIGTERM to the coordinator then ends the job at once as preempted, exit 0 everywhere,
/// and the checkpoint is there for the relaunch.
#[test]
fn preempting_a_holding_job_stops_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, mut coord, addr, log) = two_of_two(dir.path(), 120);
    let spawn = || {
        Command::new(bin("scfm-worker"))
            .args(["join", "--coordinator", &format!("http://{addr}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut w0, mut w1) = (spawn(), spawn());
    let mut seen = Vec::new();
    let until = |needle: &str, seen: &mut Vec<String>| loop {
        let line = log
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no `{needle}`:\n{}", seen.join("\n")));
        let hit = line.contains(needle);
        seen.push(line);
        if hit {
            break;
        }
    };
    until("train step=20 ", &mut seen);
    w1.kill().unwrap();
    let _ = w1.wait();
    until("fewer than min_workers remain", &mut seen);
    // The holding member checkpoints the agreed state.
    let t = std::time::Instant::now();
    while !ckpt.join("latest.json").is_file() {
        assert!(t.elapsed() < Duration::from_secs(60), "no hold checkpoint");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    sigterm(&coord);
    let status = wait_exit(&mut coord, Duration::from_secs(60), "coordinator");
    seen.extend(log.try_iter());
    let text = seen.join("\n");
    assert!(status.success(), "{text}");
    assert!(
        text.contains("preempted while no generation trains"),
        "{text}"
    );
    let s0 = wait_exit(&mut w0, Duration::from_secs(60), "survivor");
    assert!(s0.success(), "survivor exit {s0}");
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("latest.json")).unwrap()).unwrap();
    assert!(latest["step"].as_u64().unwrap() >= 20, "{latest}");
}

/// TLS on the coordinator's endpoint: certificates made with openssl, workers verify the
/// coordinator against the CA and train.
#[test]
fn tls_cluster_trains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certificates(d);
    let training = "  batch_size: 8\n  max_steps: 3\n  eval_every: 100\n  threads: 1";
    let m = write_manifest(d, &d.join("ckpt"), TINY, training, "  max_workers: 2");
    let mut text = std::fs::read_to_string(&m).unwrap();
    text.push_str("auth:\n  token: tls-test\n  tls: {cert: server.pem, key: server.key, ca: ca.pem, domain: localhost}\n");
    std::fs::write(&m, text).unwrap();
    let err = local(&m, 2);
    assert!(err.contains("https://127.0.0.1:"), "{err}");
    assert!(d.join("ckpt/ckpt-000000003/model.safetensors").exists());
}

/// Preemption: SIGTERM to `scfm local` mid-run → every worker checkpoints at the same step
/// boundary and the command exits 0; running the same manifest again resumes and ends with
/// exactly the parameters of an uninterrupted run.
#[test]
fn sigterm_checkpoints_and_relaunch_matches_uninterrupted_run() {
    let training = "  seed: 11\n  batch_size: 8\n  max_steps: 400\n  eval_every: 1000\n  threads: 1\n  log_every: 1";
    let a = tempfile::tempdir().unwrap();
    let ma = write_manifest(
        a.path(),
        &a.path().join("ckpt"),
        TINY,
        training,
        "  max_workers: 2",
    );
    local(&ma, 2);

    let b = tempfile::tempdir().unwrap();
    let mb = write_manifest(
        b.path(),
        &b.path().join("ckpt"),
        TINY,
        training,
        "  max_workers: 2",
    );
    let mut child = Command::new(bin("scfm"))
        .arg("local")
        .arg(&mb)
        .args(["--workers", "2"])
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (step lines from the coordinator), then SIGTERM.
    let (rx, reader) = lines(child.stderr.take().unwrap());
    let start = std::time::Instant::now();
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("no output from scfm local");
        let started = line.contains("scfm_coordinator::metrics: train step=20 ");
        seen.push(line);
        if started {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
    }
    sigterm(&child);
    let status = wait_exit(
        &mut child,
        Duration::from_secs(60),
        "scfm local after SIGTERM",
    );
    reader.join().unwrap();
    seen.extend(rx.try_iter());
    let log = seen.join("\n");
    assert!(status.success(), "SIGTERM must end in exit 0:\n{log}");
    assert!(log.contains("preempted at step"), "{log}");
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.path().join("ckpt/latest.json")).unwrap()).unwrap();
    let stopped = latest["step"].as_u64().unwrap();
    assert!((20..400).contains(&stopped), "checkpoint at step {stopped}");

    // Relaunch: resumes from the checkpoint and finishes.
    let log = local(&mb, 2);
    assert!(
        log.contains(&format!(
            "resuming from a verified checkpoint step={stopped}"
        )),
        "{log}"
    );
    let fa = std::fs::read(a.path().join("ckpt/ckpt-000000400/model.safetensors")).unwrap();
    let fb = std::fs::read(b.path().join("ckpt/ckpt-000000400/model.safetensors")).unwrap();
    assert!(
        fa == fb,
        "resumed run ended with other parameters than the uninterrupted one"
    );
}

/// A coordinator whose workers never come fails after the join timeout instead of waiting
/// forever.
#[test]
fn launch_without_workers_fails_after_join_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_manifest(
        dir.path(),
        &dir.path().join("ckpt"),
        TINY,
        "  batch_size: 8",
        "  min_workers: 2\n  max_workers: 2\n  join_timeout_s: 1",
    );
    let out = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("launch")
            .arg(&m)
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only 0 of the 2 required workers joined within 1 s"),
        "{err}"
    );
}

/// SIGTERM to `scfm launch` before any worker joined is a preemption like any other: the
/// command exits 0 and says that nothing had started.
#[test]
fn sigterm_before_any_worker_joined_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_manifest(
        dir.path(),
        &dir.path().join("ckpt"),
        TINY,
        "  batch_size: 8",
        "  max_workers: 2",
    );
    let mut child = Command::new(bin("scfm"))
        .arg("launch")
        .arg(&m)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (out, _o) = lines(child.stdout.take().unwrap());
    let line = out
        .recv_timeout(Duration::from_secs(60))
        .expect("scfm launch printed nothing");
    assert!(line.starts_with("coordinator listening on"), "{line}");
    let (err, e) = lines(child.stderr.take().unwrap());
    sigterm(&child);
    let status = wait_exit(
        &mut child,
        Duration::from_secs(30),
        "scfm launch after SIGTERM",
    );
    e.join().unwrap();
    let log: Vec<String> = err.try_iter().collect();
    let log = log.join("\n");
    assert!(status.success(), "{status}\n{log}");
    assert!(
        log.contains("job test preempted before training started: nothing new to checkpoint"),
        "{log}"
    );
}

/// When the process reading `scfm local`'s output goes away (its stderr is a closed
/// pipe), `scfm local` still drains its workers' output, so SIGTERM stops the job at the
/// next step with a checkpoint, and it exits 0.
#[test]
fn a_closed_stderr_does_not_block_the_shutdown_of_scfm_local() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_manifest(
        dir.path(),
        &dir.path().join("ckpt"),
        TINY,
        "  batch_size: 8\n  max_steps: 100000\n  eval_every: 100000\n  threads: 1\n  log_every: 1",
        "  max_workers: 2",
    );
    let mut child = Command::new(bin("scfm"))
        .arg("local")
        .arg(&m)
        .args(["--workers", "2"])
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        // Read until training is under way, then close the pipe.
        while std::io::BufRead::read_line(&mut stderr, &mut line).unwrap_or(0) > 0 {
            if line.contains("train step=5 ") {
                let _ = tx.send(());
                return;
            }
            line.clear();
        }
    });
    rx.recv_timeout(Duration::from_secs(180))
        .expect("training did not start");
    reader.join().unwrap();
    // Long enough for the workers to fill the pipes of an undrained output.
    std::thread::sleep(Duration::from_secs(5));
    sigterm(&child);
    let status = wait_exit(
        &mut child,
        Duration::from_secs(60),
        "scfm local with a closed stderr, after SIGTERM",
    );
    assert!(status.success(), "{status}");
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("ckpt/latest.json")).unwrap())
            .unwrap();
    assert!(latest["step"].as_u64().unwrap() >= 5, "{latest}");
}

/// Relaunching a manifest whose model settings changed since its checkpoints is refused
/// by the coordinator before any worker starts, naming the difference; `--fresh` discards
/// the old checkpoints and starts over. A change of the read-out alone resumes.
#[test]
fn changed_settings_are_refused_with_the_difference_and_fresh_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let training = "  batch_size: 8\n  max_steps: 3\n  eval_every: 100\n  threads: 1";
    let m = write_manifest(d, &d.join("ckpt"), TINY, training, "  max_workers: 2");
    let err = local(&m, 2);
    // Both workers standardise the GEPC targets by the same statistics (the sample does
    // not depend on the rank).
    let digests: Vec<(&str, &str)> = err
        .lines()
        .filter(|l| l.contains("GEPC targets standardised"))
        .filter_map(|l| {
            let worker = l.split(']').next()?.trim_start_matches('[');
            let digest = l.split("digest=").nth(1)?.split_whitespace().next()?;
            Some((worker, digest))
        })
        .collect();
    assert_eq!(digests.len(), 2, "{err}");
    assert_ne!(digests[0].0, digests[1].0, "{digests:?}");
    assert_eq!(digests[0].1, digests[1].1, "{digests:?}");
    // Only how the model reads its cells out changed: both workers resume at step 3, and
    // the checkpoint of step 4 carries the new read-out.
    let read_out = format!("{TINY}\n  metric_weight: 0.25");
    let more = training.replace("max_steps: 3", "max_steps: 4");
    let m = write_manifest(d, &d.join("ckpt"), &read_out, &more, "  max_workers: 2");
    local(&m, 2);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("ckpt/ckpt-000000004/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["state"]["model"]["metric_weight"], 0.25, "{state}");
    assert_eq!(state["state"]["step"], 4, "{state}");
    let changed = TINY.replace("n_layers: 1", "n_layers: 2");
    let m = write_manifest(d, &d.join("ckpt"), &changed, training, "  max_workers: 2");
    let out = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("local")
            .arg(&m)
            .args(["--workers", "2"]),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("model.n_layers: 1 -> 2") && err.contains("--fresh"),
        "{err}"
    );
    assert!(
        !err.contains("worker joined"),
        "refused before workers start: {err}"
    );
    let out = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("local")
            .arg(&m)
            .args(["--workers", "2", "--fresh"]),
        Duration::from_secs(300),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("discarded earlier checkpoints"), "{err}");
}

/// A job of `max_steps` on a fixed port of 127.0.0.1 (so that a relaunched coordinator
/// is found at the same address) with the shared token `token`; `edit` changes the
/// manifest's text. Returns the manifest and the port.
fn fixed_port_job(
    d: &std::path::Path,
    max_steps: u64,
    token: &str,
    edit: impl Fn(String) -> String,
) -> (std::path::PathBuf, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let training = format!(
        "  batch_size: 8\n  max_steps: {max_steps}\n  eval_every: 1000\n  log_every: 10\n  threads: 1"
    );
    let cluster = format!("  max_workers: 2\n  coordinator: 127.0.0.1:{port}\n  heartbeat_ms: 200");
    let m = write_manifest(d, &d.join("ckpt"), TINY, &training, &cluster);
    let text = edit(std::fs::read_to_string(&m).unwrap());
    std::fs::write(&m, format!("{text}auth:\n  token: {token}\n")).unwrap();
    (m, port)
}

/// `scfm launch MANIFEST` with its stderr piped.
fn launch_logged(m: &std::path::Path) -> std::process::Child {
    Command::new(bin("scfm"))
        .arg("launch")
        .arg(m)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// A worker joining the coordinator on `port` of 127.0.0.1 with `token`.
fn join_fixed(port: u16, token: &str, stderr: std::process::Stdio) -> std::process::Child {
    Command::new(bin("scfm-worker"))
        .args(["join", "--bind", "127.0.0.1", "--coordinator"])
        .arg(format!("http://127.0.0.1:{port}"))
        .env("SCFM_TOKEN", token)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// The coordinator is killed (SIGKILL) mid-run and started again on the same address a
/// few seconds later: it adopts the running workers from `coordinator.json` (they keep
/// training and reconnect), and the run completes. No metrics are lost: what the dead
/// coordinator had received but not written, and what the workers made while it was
/// down, they send again; every worker's every step is in the log exactly once.
#[test]
fn a_restarted_coordinator_adopts_the_running_workers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (m, port) = fixed_port_job(d, 600, "restart-test", |t| t);
    let launch = || launch_logged(&m);
    let mut first = launch();
    let (rx, _r1) = lines(first.stderr.take().unwrap());
    let mut workers: Vec<std::process::Child> = (0..2)
        .map(|_| join_fixed(port, "restart-test", std::process::Stdio::null()))
        .collect();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the first coordinator logged no step 50");
        if line.contains("scfm_coordinator::metrics: train step=50 ") {
            break;
        }
    }
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(d.join("ckpt/coordinator.json").is_file());
    // The workers train on meanwhile; their reports wait.
    std::thread::sleep(Duration::from_secs(3));
    let mut second = launch();
    let (rx2, r2) = lines(second.stderr.take().unwrap());
    let status = wait_exit(
        &mut second,
        Duration::from_secs(240),
        "restarted coordinator",
    );
    r2.join().unwrap();
    let log: Vec<String> = rx2.try_iter().collect();
    let log = log.join("\n");
    assert!(status.success(), "{log}");
    assert!(log.contains("adopting its workers"), "{log}");
    assert!(log.contains("finished at step 600"), "{log}");
    for w in &mut workers {
        let s = wait_exit(w, Duration::from_secs(60), "worker");
        assert!(s.success(), "worker exit {s}");
    }
    assert!(d.join("ckpt/ckpt-000000600/model.safetensors").is_file());
    assert!(!d.join("ckpt/coordinator.json").exists());
    let mut count: HashMap<(String, u64), usize> = HashMap::new();
    for l in metric_steps(&d.join("ckpt")) {
        if l["event"] == "step" {
            let w = l["worker"].as_str().unwrap().to_string();
            *count.entry((w, l["step"].as_u64().unwrap())).or_default() += 1;
        }
    }
    let mut problems = Vec::new();
    for w in ["w0000", "w0001"] {
        for step in 1..=600 {
            match count.get(&(w.to_string(), step)).copied().unwrap_or(0) {
                1 => {}
                n => problems.push(format!("{w} step {step}: {n} lines")),
            }
        }
    }
    assert_eq!(count.len(), 1200, "lines of other workers or steps");
    assert!(
        problems.is_empty(),
        "{} (worker, step) pairs not logged exactly once, e.g. {:?}",
        problems.len(),
        &problems[..problems.len().min(8)]
    );
}

/// The coordinator and every worker are killed (SIGKILL: a node lost, or a scheduler's
/// hard kill) and the job is started again with new workers (a requeued Slurm job, a
/// re-created Kubernetes Job): the new coordinator first expects the dead workers back
/// from `coordinator.json`, the new workers wait for a place instead of giving up on a
/// full cluster, the dead ones are dropped after `worker_timeout_s`, and the run
/// completes from its newest checkpoint.
#[test]
fn a_job_killed_whole_restarts_with_new_workers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (m, port) = fixed_port_job(d, 400, "kill-test", |t| {
        t.replace("worker_timeout_s: 20", "worker_timeout_s: 3")
            .replace("every_steps: 1000", "every_steps: 50")
    });
    let launch = || launch_logged(&m);
    let workers = |log: &str| -> Vec<std::process::Child> {
        (0..2)
            .map(|i| {
                let f = std::fs::File::create(d.join(format!("{log}{i}.log"))).unwrap();
                join_fixed(port, "kill-test", f.into())
            })
            .collect()
    };
    let mut first = launch();
    let (rx, _r1) = lines(first.stderr.take().unwrap());
    let mut old = workers("old");
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the first coordinator logged no step 120");
        if line.contains("scfm_coordinator::metrics: train step=120 ") {
            break;
        }
    }
    first.kill().unwrap();
    for w in &mut old {
        w.kill().unwrap();
    }
    first.wait().unwrap();
    for w in &mut old {
        w.wait().unwrap();
    }
    assert!(d.join("ckpt/coordinator.json").is_file());

    let mut second = launch();
    let (rx2, r2) = lines(second.stderr.take().unwrap());
    let mut new = workers("new");
    let status = wait_exit(&mut second, Duration::from_secs(240), "relaunched job");
    r2.join().unwrap();
    let log: Vec<String> = rx2.try_iter().collect();
    let log = log.join("\n");
    let wlog = |i: usize| std::fs::read_to_string(d.join(format!("new{i}.log"))).unwrap();
    assert!(
        status.success(),
        "{log}\n--- worker 0:\n{}\n--- worker 1:\n{}",
        wlog(0),
        wlog(1)
    );
    assert!(log.contains("finished at step 400"), "{log}");
    assert!(log.contains("adopting its workers"), "{log}");
    let both = format!("{}{}", wlog(0), wlog(1));
    assert!(
        both.contains("registration deferred") && both.contains("not heard from yet"),
        "the new workers were never told to wait for a place:\n{both}"
    );
    for (i, w) in new.iter_mut().enumerate() {
        let s = wait_exit(w, Duration::from_secs(60), "new worker");
        assert!(s.success(), "worker exit {s}:\n{}", wlog(i));
    }
    assert!(d.join("ckpt/ckpt-000000400/model.safetensors").is_file());
}

/// A coordinator started with `--fresh` over a checkpoint URL that still holds another
/// coordinator's `coordinator.json` (a killed coordinator of the same run id) removes it
/// before any worker joins: left there, its newer generation would fence the new job's
/// checkpoints (worker/src/fence.rs).
#[test]
fn a_fresh_coordinator_removes_a_stale_coordinator_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ckpt = d.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let stale = serde_json::json!({
        "run_id": "test", "generation": 7,
        "members": [{"id": "w99", "ring_addr": "127.0.0.1:9", "hostname": "gone", "device": "cpu"}],
        "step": 40, "epoch": 0, "position": 640, "resume_dir": null, "next_id": 100
    });
    std::fs::write(
        ckpt.join("coordinator.json"),
        serde_json::to_vec(&stale).unwrap(),
    )
    .unwrap();
    let m = write_manifest(
        d,
        &ckpt,
        TINY,
        "  max_steps: 3\n  threads: 1",
        "  max_workers: 2",
    );
    let mut cmd = Command::new(bin("scfm"));
    cmd.arg("launch").arg(&m).arg("--fresh");
    let (mut coord, _addr, _log) = scfm_tests::launch_coordinator_with(cmd);
    let gone = !ckpt.join("coordinator.json").exists();
    let _ = coord.kill();
    let _ = wait_exit(&mut coord, Duration::from_secs(30), "coordinator");
    assert!(gone, "the stale coordinator.json is still there");
}
