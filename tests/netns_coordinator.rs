//! The coordinator cut off from every worker (tests/netns_harness), for less and for
//! more than `worker_timeout_s`. The workers do not need the coordinator to train: their
//! ring goes on. A short cut costs nothing; past the timeout the coordinator declares
//! every worker lost, and the workers, once they reach it again, hear that they were
//! dropped and exit 3; the job then goes on only with workers that join anew, from the
//! newest checkpoint (docs/operations.md, "The coordinator dies").

use std::time::{Duration, Instant};

use scfm_tests::netns_harness::{Direction, Job, Net, write_job};
use scfm_tests::{TINY, accounting, generations};

/// Cells per worker and step.
const BATCH: u64 = 16;

/// The manifest's sections: 3 workers (at least 2), the tiny model for `max_steps`.
fn sections(max_steps: u64, worker_timeout_s: u64) -> (String, String) {
    (
        format!(
            "  seed: 9\n  batch_size: {BATCH}\n  max_steps: {max_steps}\n  threads: 1\n  log_every: 5\n  eval_every: 100000"
        ),
        format!(
            "  min_workers: 2\n  max_workers: 3\n  heartbeat_ms: 200\n  worker_timeout_s: {worker_timeout_s}\n  collective_timeout_s: 10\n  join_timeout_s: 60\n  checksum_every: 10"
        ),
    )
}

/// The `train step=N` lines rank 0 logged between its first and its last failed
/// heartbeat: it trained on while the coordinator did not answer. The worker that logged
/// `rank=0` in its first assignment is rank 0.
fn steps_trained_unheard(job: &Job) -> Vec<u64> {
    let log = job
        .workers
        .iter()
        .map(|(_, w)| w.log_text())
        .find(|l| {
            l.lines()
                .find(|l| l.contains(" assignment "))
                .is_some_and(|l| l.contains("rank=0 "))
        })
        .expect("a worker was rank 0");
    let lines: Vec<&str> = log.lines().collect();
    let failed = |l: &&str| l.contains("heartbeat timed out");
    let (Some(first), Some(last)) = (
        lines.iter().position(failed),
        lines.iter().rposition(failed),
    ) else {
        return Vec::new();
    };
    lines[first..last]
        .iter()
        .filter(|l| l.contains("scfm_worker::trainer") && l.contains(" train "))
        .filter_map(|l| l.split(" step=").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

/// Cut off for 2.5 s with a 6 s timeout: nobody is lost, no generation forms, the workers
/// train on meanwhile, and every step of every worker reaches the metrics log (the
/// reports the coordinator did not acknowledge are sent again).
#[test]
fn a_coordinator_cut_off_for_less_than_the_timeout_loses_nobody() {
    let Some(net) = Net::start(4, "coordinator cut off briefly") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (training, cluster) = sections(300, 6);
    let files = write_job(dir.path(), &net, 0, TINY, &training, &cluster, 1000);
    let mut job = Job::start(&net, dir.path(), files, 0, &[1, 2, 3]);
    let t_start = Instant::now();
    job.wait_log("train step=20 ", Duration::from_secs(120));
    net.partition(0, Direction::Both).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    net.heal(0).unwrap();
    let (status, text) = job.finish(Duration::from_secs(300));
    assert!(status.success(), "{text}\n{}", job.worker_logs());
    for i in 0..3 {
        let s = job.wait_worker(i, Duration::from_secs(60));
        assert!(s.success(), "worker {i}: {s}\n{}", job.worker_logs());
    }
    assert!(!text.contains("worker lost"), "{text}");
    let lines = job.metrics();
    assert_eq!(generations(&lines), vec![], "{text}");
    let (steps, _, worlds) = accounting(&lines, BATCH);
    assert_eq!(*steps.keys().last().unwrap(), 300);
    assert_eq!(worlds, [3].into());
    assert!(
        steps.values().all(|(_, _, _, ranks)| ranks.len() == 3),
        "a worker's report of a step is missing"
    );
    let unheard = steps_trained_unheard(&job);
    assert!(!unheard.is_empty(), "{}", job.worker_logs());
    let prints = job.fingerprints(&[0, 1, 2]);
    assert!(prints.iter().all(|p| *p == prints[0]), "{prints:?}");
    eprintln!(
        "coordinator cut off 2.5 s: rank 0 logged steps {unheard:?} after its first failed heartbeat; {:?} in all",
        t_start.elapsed()
    );
}

/// Cut off past the timeout (3 s): the coordinator loses all three workers and waits for
/// workers to join. The workers train on, unaware; when the cut heals, each hears that
/// it was dropped and exits 3, and what they trained after the newest checkpoint is
/// lost. Three new workers join, continue from that checkpoint, and the job completes.
#[test]
fn a_coordinator_cut_off_past_the_timeout_drops_every_worker_and_new_ones_resume_the_checkpoint() {
    let Some(net) = Net::start(4, "coordinator cut off past the timeout") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (training, cluster) = sections(400, 3);
    let files = write_job(dir.path(), &net, 0, TINY, &training, &cluster, 25);
    let mut job = Job::start(&net, dir.path(), files, 0, &[1, 2, 3]);
    let t_start = Instant::now();
    job.wait_log("train step=20 ", Duration::from_secs(120));
    net.partition(0, Direction::Both).unwrap();
    let t0 = Instant::now();
    job.wait_log("no workers left", Duration::from_secs(30));
    let emptied = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    net.heal(0).unwrap();
    for i in 0..3 {
        let s = job.wait_worker(i, Duration::from_secs(60));
        let l = job.workers[i].1.log_text();
        assert_eq!(s.code(), Some(3), "worker {i}:\n{l}");
        assert!(l.contains("the coordinator dropped this worker"), "{l}");
    }
    let lost = job
        .seen
        .iter()
        .filter(|l| l.contains("worker lost"))
        .count();
    assert_eq!(lost, 3, "{}", job.seen.join("\n"));
    assert!(job.logged("no heartbeat for 3 s"));
    let unheard = steps_trained_unheard(&job);
    assert!(!unheard.is_empty(), "{}", job.worker_logs());

    // New workers join: no member has a state, so they load the newest checkpoint.
    for h in 1..=3 {
        job.add_worker(h);
    }
    let (status, text) = job.finish(Duration::from_secs(300));
    assert!(status.success(), "{text}\n{}", job.worker_logs());
    for i in 3..6 {
        let s = job.wait_worker(i, Duration::from_secs(60));
        assert!(s.success(), "worker {i}: {s}\n{}", job.worker_logs());
    }
    let resumed: Vec<u64> = (3..6)
        .filter_map(|i| {
            let l = job.workers[i].1.log_text();
            l.lines()
                .find(|l| l.contains("loaded the newest checkpoint"))
                .and_then(|l| l.split(" step=").nth(1)?.split(' ').next()?.parse().ok())
        })
        .collect();
    // A new worker that joins after the others started loads a newer checkpoint (theirs).
    assert_eq!(resumed.len(), 3, "{}", job.worker_logs());
    let from = *resumed.iter().min().unwrap();
    assert!(
        resumed.iter().all(|s| s.is_multiple_of(25)) && from >= 25,
        "resumed at {resumed:?}"
    );
    let trained_to = *unheard.iter().max().unwrap();
    let lines = job.metrics();
    // The new workers form one generation, or (one was ready sooner) a smaller one first;
    // the last has all three.
    let gens = generations(&lines);
    assert_eq!(gens.last(), Some(&(gens.len() as u64 + 1, 3)), "{text}");
    let (steps, _, _) = accounting(&lines, BATCH);
    assert_eq!(*steps.keys().last().unwrap(), 400);
    let prints = job.fingerprints(&[3, 4, 5]);
    assert!(prints.iter().all(|p| *p == prints[0]), "{prints:?}");
    eprintln!(
        "coordinator cut off past the timeout: all lost {emptied:?} after the cut; the dropped workers \
         trained to step {trained_to} at least, the new ones resumed at {from}; {:?} in all",
        t_start.elapsed()
    );
}

/// The coordinator cut off from its workers only (they still reach each other and the
/// checkpoint store), past the timeout. The coordinator drops them and forms a new
/// generation of two new workers from the newest checkpoint; the dropped generation never
/// hears of it from the coordinator. Without the fence (worker/src/fence.rs) both wrote
/// checkpoints of the same steps under the same URL (and pruned each other's), and the
/// job's final checkpoint could hold the dropped generation's parameters. What holds: a
/// dropped generation writes no checkpoint after the newer generation formed, and its
/// workers end (exit 3).
#[test]
fn a_generation_cut_off_from_the_coordinator_only_writes_no_checkpoint_over_the_new_one() {
    let Some(net) = Net::start(6, "split brain") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (training, cluster) = sections(400, 3);
    let files = write_job(dir.path(), &net, 0, TINY, &training, &cluster, 25);
    let mut job = Job::start(&net, dir.path(), files, 0, &[1, 2, 3]);
    job.wait_log("train step=20 ", Duration::from_secs(120));
    net.partition_from(0, &[1, 2, 3], Direction::Both).unwrap();
    job.wait_log("no workers left", Duration::from_secs(30));
    for h in [4, 5] {
        job.add_worker(h);
    }
    let (status, text) = job.finish(Duration::from_secs(300));
    assert!(status.success(), "{text}\n{}", job.worker_logs());
    // Give the dropped generation the time to finish its steps too.
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end
        && !(0..3).all(|i| job.workers[i].1.log_text().contains("worker done"))
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let resumed_at: u64 = job.workers[3]
        .1
        .log_text()
        .lines()
        .find(|l| l.contains("loaded the newest checkpoint"))
        .and_then(|l| l.split(" step=").nth(1)?.split(' ').next()?.parse().ok())
        .expect("the new worker loaded a checkpoint");
    let saved_after: Vec<String> = (0..3)
        .flat_map(|i| {
            job.workers[i]
                .1
                .log_text()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|l| {
            l.contains("checkpoint saved")
                && l.split(" step=")
                    .nth(1)
                    .and_then(|r| r.split(' ').next()?.parse::<u64>().ok())
                    .is_some_and(|s| s > resumed_at)
        })
        .collect();
    assert!(
        saved_after.is_empty(),
        "the dropped generation wrote {} checkpoints of steps past {resumed_at}, where the new \
         generation writes its own, e.g.:\n{}",
        saved_after.len(),
        saved_after.last().unwrap()
    );
    let fenced = (0..3)
        .filter(|&i| job.workers[i].1.log_text().contains("without this worker"))
        .count();
    assert!(
        fenced >= 1,
        "no dropped worker was fenced:\n{}",
        job.worker_logs()
    );
}
