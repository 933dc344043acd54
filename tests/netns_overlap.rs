//! Overlapped vs flat gradient all-reduce (a benchmark, not part of the default test run):
//! jobs of 2 and 3 workers, each on a namespaced host whose link is capped (tbf), train
//! the `minimal` preset with `cluster.overlap_allreduce` on and off, the two alternating
//! in order every round. Per round: the median step time over the steps after warm-up
//! (every rank's `step_s`), the all-reduce's busy time (`allreduce_s`) and the part the
//! step waited for (`allreduce_wait_s`). Over the rounds: medians with min–max, and the
//! flat/overlapped ratio unless a side's spread exceeds 25% of its median.
//!
//! The bound: a step cannot be shorter than max(compute, all-reduce); the overlapped step
//! is at least compute + the last bucket's all-reduce (the embeddings, which the GEPC
//! decoder also uses, are final only at the end of the backward pass).
//!
//! Run: `cargo test --release -p scfm-tests --test netns_overlap -- --ignored --nocapture`
//! (`SCFM_OVERLAP_MBIT`, default 100; `SCFM_OVERLAP_ROUNDS`, default 5;
//! `SCFM_OVERLAP_WORKERS`, default `2,3`; `SCFM_OVERLAP_STEPS`, default 40).

use std::time::{Duration, Instant};

use scfm_tests::netns_harness::{Job, Net, write_job};

/// Steps skipped at the start of each run (model build, first allocations).
const WARMUP: u64 = 8;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One run's medians: step time, all-reduce busy time, all-reduce wait.
#[derive(Debug, Clone, Copy)]
struct Run {
    step_s: f64,
    busy_s: f64,
    wait_s: f64,
}

/// Runs one job of `workers` workers (hosts 1..=workers) for `steps` steps.
fn run(net: &Net, workers: usize, steps: u64, overlap: bool) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let model = "  preset: minimal";
    let training = format!(
        "  seed: 5\n  batch_size: 16\n  max_steps: {steps}\n  threads: 1\n  log_every: 1\n  eval_every: 100000"
    );
    let cluster = format!(
        "  min_workers: {workers}\n  max_workers: {workers}\n  heartbeat_ms: 200\n  worker_timeout_s: 20\n  \
         collective_timeout_s: 30\n  join_timeout_s: 60\n  overlap_allreduce: {overlap}"
    );
    let files = write_job(dir.path(), net, 0, model, &training, &cluster, 100_000);
    let hosts: Vec<usize> = (1..=workers).collect();
    let mut job = Job::start(net, dir.path(), files, 0, &hosts);
    let (status, text) = job.finish(Duration::from_secs(600));
    assert!(status.success(), "{text}\n{}", job.worker_logs());
    let lines: Vec<serde_json::Value> = job
        .metrics()
        .into_iter()
        .filter(|l| l["event"] == "step" && l["step"].as_u64().unwrap() > WARMUP)
        .collect();
    assert_eq!(lines.len(), workers * (steps - WARMUP) as usize);
    if overlap {
        let log = job.workers[0].1.log_text();
        let buckets = log
            .lines()
            .find_map(|l| {
                Some(
                    l.split("buckets of ")
                        .nth(1)?
                        .split(" parameters")
                        .next()?
                        .to_string(),
                )
            })
            .unwrap_or_else(|| panic!("the worker did not overlap:\n{log}"));
        eprintln!("gradient buckets (parameters, backward order): {buckets}");
    }
    let col = |k: &str| -> Vec<f64> { lines.iter().map(|l| l[k].as_f64().unwrap()).collect() };
    Run {
        step_s: median(&mut col("step_s")),
        busy_s: median(&mut col("allreduce_s")),
        wait_s: median(&mut col("allreduce_wait_s")),
    }
}

/// Median with min and max of `f` over the runs, and the spread (max − min) / median.
fn summary(runs: &[Run], f: impl Fn(&Run) -> f64) -> (f64, f64, f64, f64) {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    let m = median(&mut v);
    let (lo, hi) = (v[0], v[v.len() - 1]);
    (m, lo, hi, (hi - lo) / m)
}

#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn overlapped_all_reduce_vs_flat_on_capped_links() {
    let mbit: u32 = env_or("SCFM_OVERLAP_MBIT", 100);
    let rounds: usize = env_or("SCFM_OVERLAP_ROUNDS", 5);
    let steps: u64 = env_or("SCFM_OVERLAP_STEPS", 40);
    let sizes: Vec<usize> = std::env::var("SCFM_OVERLAP_WORKERS")
        .unwrap_or_else(|_| "2,3".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("SCFM_OVERLAP_WORKERS: a list of counts")
        })
        .collect();
    let most = *sizes.iter().max().unwrap();
    let Some(net) = Net::start(most + 1, "overlap bench") else {
        return;
    };
    for h in 1..=most {
        net.cap_bandwidth(h, mbit).unwrap();
    }
    let t0 = Instant::now();
    for &w in &sizes {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let order = if r % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for overlap in order {
                let x = run(&net, w, steps, overlap);
                eprintln!(
                    "{w} workers, {mbit} Mbit/s, round {r}, overlap {overlap}: step {:.3} s, \
                     all-reduce {:.3} s, waited {:.3} s",
                    x.step_s, x.busy_s, x.wait_s
                );
                if overlap { on.push(x) } else { off.push(x) }
            }
        }
        let show = |name: &str, runs: &[Run]| {
            let (s, slo, shi, spread) = summary(runs, |r| r.step_s);
            let (b, ..) = summary(runs, |r| r.busy_s);
            let (wt, ..) = summary(runs, |r| r.wait_s);
            eprintln!(
                "| {w} | {name} | {s:.3} ({slo:.3}–{shi:.3}) | {b:.3} | {wt:.3} | {:.3} |",
                s - wt
            );
            (s, spread)
        };
        eprintln!(
            "| workers | all-reduce | step s, median (min–max) | all-reduce busy s | waited s | step − wait s |"
        );
        let (s_off, sp_off) = show("flat, after backward", &off);
        let (s_on, sp_on) = show("overlapped", &on);
        if sp_off > 0.25 || sp_on > 0.25 {
            eprintln!(
                "{w} workers: no ratio: spread {:.0}% (flat) / {:.0}% (overlapped) exceeds 25%",
                sp_off * 100.0,
                sp_on * 100.0
            );
        } else {
            eprintln!(
                "{w} workers: flat / overlapped step time = {:.2}x (spread {:.0}% / {:.0}%)",
                s_off / s_on,
                sp_off * 100.0,
                sp_on * 100.0
            );
        }
    }
    eprintln!("{:?} in all", t0.elapsed());
}
