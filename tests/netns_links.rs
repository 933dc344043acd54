//! Degraded links under a running job (tests/netns_harness): packet loss on every link
//! changes nothing in the result (training is deterministic on CPU and the ring is TCP),
//! 50 ms of latency likewise (the harness's delay line; skipped loudly where TUN devices
//! cannot be made), and a link capped at 100 Mbit/s bounds the gradient all-reduce by the bytes
//! the ring sends over it.

use std::path::Path;
use std::time::{Duration, Instant};

use scfm_tests::netns_harness::{FaultError, Job, Net, write_job};
use scfm_tests::{TINY, accounting, generations, skip};

/// Trains the tiny model for `max_steps` steps with 3 workers (hosts 1 to 3, coordinator
/// in host 0) in `dir`, with whatever faults the net has; asserts that it completes
/// without a membership change and returns the final checkpoint's parameters (bytes) and
/// the workers' fingerprint.
fn run_clean_job(net: &Net, dir: &Path, max_steps: u64) -> (Vec<u8>, String) {
    let training = format!(
        "  seed: 13\n  batch_size: 16\n  max_steps: {max_steps}\n  threads: 1\n  log_every: 10\n  eval_every: 50"
    );
    // Generous timeouts: loss or latency must slow the job, not break it.
    let cluster = "  min_workers: 3\n  max_workers: 3\n  heartbeat_ms: 200\n  worker_timeout_s: 10\n  collective_timeout_s: 20\n  join_timeout_s: 60\n  checksum_every: 10";
    let files = write_job(dir, net, 0, TINY, &training, cluster, 1000);
    let mut job = Job::start(net, dir, files, 0, &[1, 2, 3]);
    let (status, text) = job.finish(Duration::from_secs(300));
    assert!(status.success(), "{text}\n{}", job.worker_logs());
    for i in 0..3 {
        let s = job.wait_worker(i, Duration::from_secs(60));
        assert!(s.success(), "worker {i}: {s}\n{}", job.worker_logs());
    }
    let lines = job.metrics();
    assert_eq!(generations(&lines), vec![], "{text}");
    let (steps, _, _) = accounting(&lines, 16);
    assert_eq!(*steps.keys().last().unwrap(), max_steps);
    let prints = job.fingerprints(&[0, 1, 2]);
    assert!(prints.iter().all(|p| *p == prints[0]), "{prints:?}");
    let model = job
        .ckpt
        .join(format!("ckpt-{max_steps:09}/model.safetensors"));
    (std::fs::read(&model).unwrap(), prints[0].clone())
}

/// 1% of the packets on every link dropped (each host drops 1% of what it sends): the job
/// completes with exactly the parameters of a clean run. Then 50 ms of latency on every
/// link as well (a shorter run, against a clean one as long).
#[test]
fn one_percent_packet_loss_on_every_link_gives_the_clean_result() {
    let Some(net) = Net::start(4, "packet loss") else {
        return;
    };
    let steps = 150;
    let clean_dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let (clean, clean_print) = run_clean_job(&net, clean_dir.path(), steps);
    let clean_s = t.elapsed();

    for h in 0..net.len() {
        net.drop_packets(h, 1.0).unwrap();
    }
    let lossy_dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let (lossy, lossy_print) = run_clean_job(&net, lossy_dir.path(), steps);
    let lossy_s = t.elapsed();
    let dropped: u64 = (0..net.len()).map(|h| net.dropped_packets(h)).sum();
    assert!(dropped > 0, "no packet was dropped");
    assert_eq!(lossy_print, clean_print);
    assert!(lossy == clean, "the lossy run ended with other parameters");
    eprintln!(
        "1% loss: {dropped} packets dropped; same parameters ({clean_print}); clean run {clean_s:?}, lossy run {lossy_s:?}"
    );

    // 50 ms each way on every link (and the loss): a step then waits for a dozen delayed
    // ring steps and RPCs (about 1 s), so this part trains fewer steps, against a clean
    // run of as many (the learning-rate schedule depends on the total).
    let slow_steps = 40;
    let (short_clean, short_print) = {
        for h in 0..net.len() {
            net.drop_packets(h, 0.0).unwrap();
        }
        let d = tempfile::tempdir().unwrap();
        run_clean_job(&net, d.path(), slow_steps)
    };
    match net.delay(0, 50, 0, 0) {
        Err(FaultError::Unsupported(why)) => {
            skip(
                "delay-line",
                &format!("50 ms latency on every link (with 1% loss) not run: {why}"),
            );
            return;
        }
        Err(e) => panic!("delay line: {e}"),
        Ok(()) => {}
    }
    for h in 0..net.len() {
        net.delay(h, 50, 0, 0).unwrap();
        net.drop_packets(h, 1.0).unwrap();
    }
    let slow_dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let (slow, slow_print) = run_clean_job(&net, slow_dir.path(), slow_steps);
    let delayed: u64 = (0..net.len()).map(|h| net.delayed_packets(h).0).sum();
    assert!(delayed > 0, "no packet went through a delay line");
    assert_eq!(slow_print, short_print);
    assert!(
        slow == short_clean,
        "the run with latency ended with other parameters"
    );
    eprintln!(
        "50 ms latency and 1% loss, {slow_steps} steps: same parameters ({slow_print}); \
         {delayed} packets delayed; {:?}",
        t.elapsed()
    );
}

/// Runs a job of 3 workers (hosts 1 to 3, coordinator in host 0) in `dir` to completion
/// and returns every rank's `allreduce_s` of each step after the fifth (warm-up), sorted,
/// with the first worker's log.
fn allreduce_times(
    net: &Net,
    dir: &Path,
    model: &str,
    training: &str,
    cluster: &str,
    steps: u64,
) -> (Vec<f64>, String) {
    let files = write_job(dir, net, 0, model, training, cluster, 1000);
    let mut job = Job::start(net, dir, files, 0, &[1, 2, 3]);
    let (status, text) = job.finish(Duration::from_secs(300));
    assert!(status.success(), "{text}\n{}", job.worker_logs());
    let mut times: Vec<f64> = job
        .metrics()
        .iter()
        .filter(|l| l["event"] == "step" && l["step"].as_u64().unwrap() > 5)
        .map(|l| l["allreduce_s"].as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 3 * (steps as usize - 5));
    times.sort_by(f64::total_cmp);
    (times, job.workers[0].1.log_text())
}

/// Host 2's link capped at 100 Mbit/s both ways: every gradient all-reduce of the ring
/// (3 workers) sends 2(N-1)/N times the gradient's bytes over each link, so its time per
/// step (`allreduce_s` in the metrics log) is at least bytes / bandwidth, and with a model
/// whose gradient is a few MB it stays within 2.5 times that.
#[test]
fn a_link_capped_at_100_mbit_bounds_the_all_reduce_by_bytes_over_bandwidth() {
    let Some(net) = Net::start(4, "bandwidth cap") else {
        return;
    };
    net.cap_bandwidth(2, 100).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // About 1.1 M parameters: 4.6 MB of gradient.
    let model = "  preset: minimal\n  hidden: 256\n  n_layers: 1\n  n_heads: 4\n  ffn_dim: 512\n  max_seq_len: 64";
    let steps = 20;
    let training = format!(
        "  seed: 3\n  batch_size: 4\n  max_steps: {steps}\n  threads: 1\n  log_every: 1\n  eval_every: 100000"
    );
    let cluster = "  min_workers: 3\n  max_workers: 3\n  heartbeat_ms: 200\n  worker_timeout_s: 10\n  collective_timeout_s: 20\n  join_timeout_s: 60";
    let t = Instant::now();
    let (times, log) = allreduce_times(&net, dir.path(), model, &training, cluster, steps);
    let params: f64 = log
        .lines()
        .find_map(|l| {
            l.split("model built (")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no parameter count in the worker's log:\n{log}"));
    let n = 3.0;
    let bytes = 2.0 * (n - 1.0) / n * 4.0 * params;
    let expected = bytes / (100e6 / 8.0);
    let median = times[times.len() / 2];
    let ratio = median / expected;
    eprintln!(
        "100 Mbit/s: {params} parameters, {:.2} MB per link and step, expected {expected:.3} s, \
         all-reduce median {median:.3} s (min {:.3}, max {:.3}): {ratio:.2} x; {:?} in all",
        bytes / 1e6,
        times[0],
        times[times.len() - 1],
        t.elapsed()
    );
    assert!(
        (0.9..=2.5).contains(&ratio),
        "all-reduce median {median:.3} s vs {expected:.3} s from bytes / bandwidth ({ratio:.2} x)"
    );
}

/// 20 ms of latency on what every host sends (the delay line): one all-reduce of the
/// flat gradient (`overlap_allreduce: false`) over the ring of 3 workers takes 2(N-1) =
/// 4 ring steps, each waiting for a chunk that crossed one delayed link, so the latency
/// term of the scaling model (docs/scaling-model.md), 2(N-1) × 20 ms = 80 ms, is its
/// floor; with a gradient this small the bandwidth term is negligible. The measured
/// median must stay within twice the floor: one extra round trip per ring step (TCP slow
/// start, Nagle) would take it to three times.
#[test]
fn latency_on_every_link_costs_the_all_reduce_two_n_minus_one_one_way_delays() {
    let Some(net) = Net::start(4, "latency term") else {
        return;
    };
    let delay_ms = 20;
    for h in 0..net.len() {
        match net.delay(h, delay_ms, 0, 0) {
            Err(FaultError::Unsupported(why)) => {
                skip("delay-line", &format!("latency term not checked: {why}"));
                return;
            }
            r => r.unwrap(),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let steps = 30;
    let training = format!(
        "  seed: 5\n  batch_size: 8\n  max_steps: {steps}\n  threads: 1\n  log_every: 1\n  eval_every: 100000"
    );
    let cluster = "  min_workers: 3\n  max_workers: 3\n  heartbeat_ms: 200\n  worker_timeout_s: 10\n  collective_timeout_s: 20\n  join_timeout_s: 60\n  overlap_allreduce: false";
    let t = Instant::now();
    let (times, _) = allreduce_times(&net, dir.path(), TINY, &training, cluster, steps);
    let median = times[times.len() / 2];
    let floor = 2.0 * (3.0 - 1.0) * f64::from(delay_ms) / 1e3;
    let passed: u64 = (0..net.len()).map(|h| net.delayed_packets(h).0).sum();
    eprintln!(
        "{delay_ms} ms on every link, 3 workers: all-reduce median {median:.3} s (min {:.3}, \
         max {:.3}) against 2(N-1) x {delay_ms} ms = {floor:.3} s: {:.2} x; {passed} packets \
         delayed; {:?} in all",
        times[0],
        times[times.len() - 1],
        median / floor,
        t.elapsed()
    );
    assert!(passed > 0);
    assert!(
        (floor..=2.0 * floor).contains(&median),
        "all-reduce median {median:.3} s vs the latency floor {floor:.3} s"
    );
}
