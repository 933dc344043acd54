//! Child processes of the scaling benchmark: run commands together with their output to
//! log files and a deadline, kill what they started (by pid) on failure, and measure their
//! CPU use between two marks in the logs from the scheduler statistics of every thread of
//! their process trees (`/proc/PID/task/TID/schedstat`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What [`run_logged`] measured.
#[derive(Clone)]
pub struct Finished {
    /// Between the two marks: CPUs the trees' threads ran on, on average (NaN without marks).
    pub cores_used: f64,
    /// Between the two marks: CPUs the threads were runnable for (running or waiting for a
    /// CPU), on average; above the machine's CPUs means they queued for one.
    pub cores_wanted: f64,
}

/// 1-minute load average.
pub fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `root` and all its live descendants, parents first.
fn tree(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat[stat.rfind(')')? + 2..].split_whitespace().nth(1)?;
            Some((pid, ppid.parse().ok()?))
        })
        .collect();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|&&(_, pp)| pp == p).map(|&(c, _)| c));
        i += 1;
    }
    out
}

/// Kills `root` and its descendants (only processes this benchmark started).
fn kill_tree(root: u32) {
    let pids: Vec<String> = tree(root).iter().map(u32::to_string).collect();
    let _ = Command::new("kill").arg("-KILL").args(&pids).status();
}

/// Latest `(on-CPU ns, runnable-but-waiting ns)` of every thread seen, by `(pid, tid)`.
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
                let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"));
                let v: Vec<u64> = text
                    .unwrap_or_default()
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

/// The last 40 lines of a log, for error messages; the whole log is kept as
/// `$TMPDIR/scfm-scaling-failed-NAME` (the run's temp dir is removed).
fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let name = log.file_name().and_then(|n| n.to_str()).unwrap_or("log");
    let kept = std::env::temp_dir().join(format!("scfm-scaling-failed-{name}"));
    let _ = std::fs::write(&kept, &s);
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(40);
    format!(
        "{}\n(whole log: {})",
        lines[from..].join("\n"),
        kept.display()
    )
}

/// Runs the commands together, each with stdout and stderr to its log, sampling their
/// process trees' scheduler statistics every 200 ms; the CPU figures of [`Finished`] are
/// taken between the first appearance of `marks[0]` and of `marks[1]` in any of the logs.
/// Fails, killing the others' process trees, when one exits unsuccessfully or when they
/// have not all ended after `timeout`.
pub fn run_logged(
    cmds: Vec<(Command, PathBuf)>,
    timeout: Duration,
    marks: Option<[&str; 2]>,
) -> Result<Finished> {
    let t = Instant::now();
    // Each command, its log and whether it has exited.
    let mut children: Vec<(Child, PathBuf, bool)> = Vec::new();
    let stop = |children: &mut Vec<(Child, PathBuf, bool)>| {
        for (c, _, done) in children.iter_mut().filter(|c| !c.2) {
            kill_tree(c.id());
            let _ = c.wait();
            *done = true;
        }
    };
    for (mut cmd, log) in cmds {
        let out = std::fs::File::create(&log)?;
        let spawned = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"));
        match spawned {
            Ok(child) => children.push((child, log, false)),
            Err(e) => {
                stop(&mut children);
                return Err(e);
            }
        }
    }
    let mut sched = Sched::default();
    // (wall s, (on-CPU s, waiting s)) when each mark appeared.
    let mut snaps: Vec<(f64, (f64, f64))> = Vec::new();
    loop {
        for (c, _, _) in children.iter().filter(|c| !c.2) {
            sched.sample(&tree(c.id()));
        }
        if let Some(mark) = marks.and_then(|m| m.get(snaps.len()).copied())
            && children
                .iter()
                .any(|c| std::fs::read_to_string(&c.1).is_ok_and(|l| l.contains(mark)))
        {
            snaps.push((t.elapsed().as_secs_f64(), sched.totals()));
        }
        let mut failed = None;
        for (c, log, done) in children.iter_mut().filter(|c| !c.2) {
            if let Some(status) = c.try_wait()? {
                *done = true;
                if !status.success() {
                    failed = Some(format!("{}: {status}\n{}", log.display(), tail(log)));
                }
            }
        }
        if let Some(f) = failed {
            stop(&mut children);
            bail!("{f}");
        }
        if children.iter().all(|c| c.2) {
            break;
        }
        if t.elapsed() > timeout {
            let logs: Vec<String> = children.iter().map(|c| tail(&c.1)).collect();
            stop(&mut children);
            bail!("timed out after {timeout:?}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (cores_used, cores_wanted) = match snaps[..] {
        [(t0, (c0, w0)), (t1, (c1, w1))] => {
            ((c1 - c0) / (t1 - t0), (c1 - c0 + w1 - w0) / (t1 - t0))
        }
        _ => (f64::NAN, f64::NAN),
    };
    Ok(Finished {
        cores_used,
        cores_wanted,
    })
}
