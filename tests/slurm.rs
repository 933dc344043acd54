//! The Slurm batch script `deploy/slurm/scfm-job.sbatch` under a real one-node Slurm
//! (munged, slurmctld and slurmd started by `tests/slurm/minicluster.sh` in a temporary
//! folder on 127.0.0.1): a 2-task job trains and checkpoints; a job requeued from outside
//! (`scontrol requeue`) and one whose batch script gets TERM (what `--signal=B:TERM@…`
//! sends before the time limit) both checkpoint, come back, resume and end with exactly
//! the parameters of the uninterrupted job; `scancel` stops a job cleanly without
//! requeueing it; a worker killed under `min_workers` fails the job with an error naming
//! its node. Prints a SKIPPED line (and passes) only where the daemons cannot start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use scfm_tests::{TINY, bin, repo_root, run_with_timeout, write_manifest};

/// A running one-node Slurm; its daemons are stopped when dropped.
struct Slurm {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = run_with_timeout(
            Command::new("bash")
                .arg(repo_root().join("tests/slurm/minicluster.sh"))
                .arg("stop")
                .arg(self.dir.path()),
            Duration::from_secs(30),
        );
    }
}

/// A free TCP port on 127.0.0.1 (for the daemons' fixed ports).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Slurm {
    /// Starts the cluster, or `None` (after a SKIPPED line) where it cannot run here.
    fn start() -> Option<Slurm> {
        let dir = tempfile::tempdir().unwrap();
        let out = run_with_timeout(
            Command::new("bash")
                .arg(repo_root().join("tests/slurm/minicluster.sh"))
                .arg("start")
                .arg(dir.path())
                .arg(free_port().to_string())
                .arg(free_port().to_string()),
            Duration::from_secs(90),
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.code() == Some(77) {
            scfm_tests::skip("slurm", err.trim());
            return None;
        }
        let conf = dir.path().join("slurm.conf");
        let slurm = Slurm { dir, conf };
        assert!(out.status.success(), "minicluster.sh start failed:\n{err}");
        Some(slurm)
    }

    /// A Slurm client command with this cluster's configuration.
    fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new(name);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// Runs a client command (30 s at most) and returns its stdout; panics on failure.
    fn run(&self, name: &str, args: &[&str]) -> String {
        let out = run_with_timeout(self.cmd(name).args(args), Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{name} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Submits the deploy script for `manifest`; returns the job id and its output file.
    fn submit(&self, manifest: &Path, name: &str) -> (String, PathBuf) {
        let out = self.dir.path().join(format!("{name}.out"));
        let sbatch = repo_root().join("deploy/slurm/scfm-job.sbatch");
        let bin_dir = bin("scfm").parent().unwrap().to_path_buf();
        let o = run_with_timeout(
            self.cmd("sbatch")
                .arg("--parsable")
                .arg(format!("--output={}", out.display()))
                .arg(&sbatch)
                .arg(manifest)
                .current_dir(self.dir.path())
                .env("SCFM_BIN", &bin_dir)
                .env("SCFM_HEAD_ADDR", "127.0.0.1")
                .env("SCFM_BIND", "127.0.0.1"),
            Duration::from_secs(30),
        );
        assert!(
            o.status.success(),
            "sbatch failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let id = String::from_utf8_lossy(&o.stdout)
            .trim()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        (id, out)
    }

    /// `FIELD=value` of `scontrol show job ID`.
    fn field(&self, id: &str, field: &str) -> String {
        let text = self.run("scontrol", &["show", "job", id, "-o"]);
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the job's state is `state` (with `restarts` restarts), or panics with
    /// the job's output after `timeout`.
    fn wait_state(&self, id: &str, out: &Path, state: &str, restarts: u32, timeout: Duration) {
        let start = Instant::now();
        loop {
            let s = self.field(id, "JobState");
            let r = self.field(id, "Restarts");
            if s == state && r == restarts.to_string() {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "job {id}: state {s}, restarts {r} after {timeout:?}, expected {state} with {restarts} restarts; output:\n{}",
                read(out)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Waits until the job's output contains `needle`.
fn wait_output(out: &Path, needle: &str, timeout: Duration) {
    let start = Instant::now();
    while !read(out).contains(needle) {
        assert!(
            start.elapsed() < timeout,
            "`{needle}` not in the job output after {timeout:?}:\n{}",
            read(out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const TRAINING: &str = "  seed: 11\n  batch_size: 8\n  max_steps: 600\n  eval_every: 1000\n  threads: 1\n  log_every: 1";
const CLUSTER: &str = "  coordinator: 0.0.0.0:0\n  max_workers: 2\n  preempt_grace_s: 60\nauth:\n  token_env: SCFM_TOKEN";

/// A job manifest for the deploy script in its own folder `name` under `root`.
fn manifest(root: &Path, name: &str, cluster: &str) -> (PathBuf, PathBuf) {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let ckpt = d.join("ckpt");
    (write_manifest(&d, &ckpt, TINY, TRAINING, cluster), ckpt)
}

fn final_params(ckpt: &Path) -> Vec<u8> {
    std::fs::read(ckpt.join("ckpt-000000600/model.safetensors")).unwrap()
}

/// Submits job `name`, stops it mid-run with `stop` (a Slurm command; the job id is
/// appended), releases the requeued job at once (Slurm holds it back for a while), waits
/// for it to complete and checks it resumed and ended with the parameters `want`.
/// Returns its output.
fn preempt_and_resume(
    slurm: &Slurm,
    root: &Path,
    name: &str,
    stop: &[&str],
    want: &[u8],
) -> String {
    let long = Duration::from_secs(300);
    let (m, ckpt) = manifest(root, name, CLUSTER);
    let (id, out) = slurm.submit(&m, name);
    wait_output(&out, "train step=50 ", long);
    let mut args = stop[1..].to_vec();
    args.push(&id);
    slurm.run(stop[0], &args);
    slurm.wait_state(&id, &out, "PENDING", 1, long);
    slurm.run(
        "scontrol",
        &["update", &format!("JobId={id}"), "StartTime=now"],
    );
    slurm.wait_state(&id, &out, "COMPLETED", 1, long);
    let log = read(&out);
    assert!(log.contains("resuming from a verified checkpoint"), "{log}");
    assert!(
        final_params(&ckpt) == want,
        "job {name} ended with other parameters than the uninterrupted one:\n{log}"
    );
    log
}

#[test]
fn slurm_job_trains_requeues_resumes_and_cancels() {
    let Some(slurm) = Slurm::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let long = Duration::from_secs(300);
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());

    // (1) An uninterrupted 2-task job.
    let (ma, ckpt_a) = manifest(work.path(), "a", CLUSTER);
    let (a, out_a) = slurm.submit(&ma, "a");
    slurm.wait_state(&a, &out_a, "COMPLETED", 0, long);
    let log = read(&out_a);
    assert!(log.contains("starting 2 workers"), "{log}");
    assert!(log.contains("job finished"), "{log}");
    assert_eq!(slurm.field(&a, "ExitCode"), "0:0", "{log}");
    let want = final_params(&ckpt_a);
    phase("uninterrupted job done");

    // (2) Requeued from outside mid-run: Slurm sends TERM to the script and the workers,
    // which agree a stop and checkpoint; the job comes back and resumes.
    let log = preempt_and_resume(&slurm, work.path(), "b", &["scontrol", "requeue"], &want);
    assert!(log.contains("preempted at step"), "{log}");
    phase("requeued job done");

    // (3) TERM to the batch script (what `--signal=B:TERM@GRACE` sends before the time
    // limit): the script checkpoints the job and requeues it itself.
    let log = preempt_and_resume(
        &slurm,
        work.path(),
        "c",
        &["scancel", "--signal=TERM", "--batch"],
        &want,
    );
    assert!(log.contains("requeueing the job to resume"), "{log}");
    phase("self-requeued job done");

    // (4) scancel: a clean checkpoint, and the job is not requeued.
    let (md, ckpt_d) = manifest(work.path(), "d", CLUSTER);
    let (d, out_d) = slurm.submit(&md, "d");
    wait_output(&out_d, "train step=50 ", long);
    slurm.run("scancel", &[&d]);
    slurm.wait_state(&d, &out_d, "CANCELLED", 0, long);
    wait_output(&out_d, "stopped after TERM", Duration::from_secs(90));
    let log = read(&out_d);
    assert!(log.contains("preempted at step"), "{log}");
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt_d.join("latest.json")).unwrap()).unwrap();
    let step = latest["step"].as_u64().unwrap();
    assert!((50..600).contains(&step), "checkpoint at step {step}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(slurm.field(&d, "JobState"), "CANCELLED");
    phase("cancelled job done");

    // (5) A worker dies and too few remain (min_workers 2): the job fails and says on
    // which node the worker was.
    let strict = CLUSTER.replace(
        "  max_workers: 2",
        "  min_workers: 2\n  max_workers: 2\n  join_timeout_s: 5",
    );
    let (me, _) = manifest(work.path(), "e", &strict);
    let (e, out_e) = slurm.submit(&me, "e");
    wait_output(&out_e, "train step=50 ", long);
    let coord = read(&out_e)
        .lines()
        .find_map(|l| {
            l.split("coordinator at ")
                .nth(1)
                .map(|r| r.split(';').next().unwrap().to_string())
        })
        .expect("the script names the coordinator's address");
    let pids = run_with_timeout(
        Command::new("pgrep").args([
            "-f",
            &format!("scfm-worker join --coordinator http://{coord} "),
        ]),
        Duration::from_secs(10),
    );
    let pid = String::from_utf8_lossy(&pids.stdout)
        .lines()
        .next()
        .expect("a worker process")
        .to_string();
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    slurm.wait_state(&e, &out_e, "FAILED", 0, long);
    let log = read(&out_e);
    let host = String::from_utf8_lossy(
        &run_with_timeout(Command::new("hostname").arg("-s"), Duration::from_secs(10)).stdout,
    )
    .trim()
    .to_string();
    assert!(
        log.contains(&format!("on node {host} exited with")),
        "the failed worker's node is not named:\n{log}"
    );
    assert!(log.contains("job failed"), "{log}");
}
