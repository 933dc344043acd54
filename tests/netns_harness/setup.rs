//! Making and removing the namespaces of a [`Net`](super::Net), and the commands (`ip`,
//! `nft`, `tc`, `kill`) the harness runs, each with a deadline.
//!
//! Every namespace of a net is named `scfmnet-PID-SEQ-…`, PID being the test process that
//! made it. A net removes its namespaces when dropped (also when its test panicked); a
//! test process that was killed cannot, so every new net first removes the namespaces of
//! that prefix whose PID is no longer a live process.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The start of every namespace name the harness makes.
pub const PREFIX: &str = "scfmnet-";

/// How long any one harness command may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(20);

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdError {
    /// The program is not installed.
    Missing(String),
    /// It ran and failed (or ran past its deadline): the command line and its stderr.
    Failed(String),
}

impl std::fmt::Display for CmdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CmdError::Missing(p) => write!(f, "`{p}` is not installed"),
            CmdError::Failed(m) => f.write_str(m),
        }
    }
}

/// Runs `program args` (with `stdin` fed to it, if any) within [`COMMAND_DEADLINE`];
/// returns its stdout. Never panics, so that it can run in `Drop`.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CmdError> {
    let line = format!("{program} {}", args.join(" "));
    let mut child = match Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CmdError::Missing(program.into()));
        }
        Err(e) => return Err(CmdError::Failed(format!("{line}: {e}"))),
    };
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        let _ = w.write_all(text.as_bytes());
    }
    // Both pipes are read on threads: a chatty command cannot fill one and block.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + COMMAND_DEADLINE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CmdError::Failed(format!(
                    "{line}: still running after {COMMAND_DEADLINE:?}"
                )));
            }
        }
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(CmdError::Failed(format!(
            "{line}: {status}: {}",
            stderr.trim()
        )))
    }
}

/// `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<String, CmdError> {
    run("ip", args, None)
}

/// Whether this process runs as root (the effective uid in `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A name for a new net, unique among the live processes: `scfmnet-PID-SEQ`.
pub fn new_name() -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The names of all network namespaces (`ip netns list` prints `NAME` or `NAME (id: N)`).
pub fn namespaces() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The pid that made namespace `name` (`scfmnet-PID-…`), if it is one of the harness's.
fn owner(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes the harness's namespaces whose owning process is dead (a test process that was
/// killed could not remove them). Namespaces of live processes are left alone.
pub fn remove_stale() {
    for ns in namespaces() {
        if let Some(pid) = owner(&ns)
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            eprintln!("netns harness: removing {ns}, left by process {pid}, which is gone");
            remove(&ns);
        }
    }
}

/// Kills every process in namespace `ns` (SIGKILL ends stopped ones too), waits a little
/// for them to go, and deletes it (with it go its interfaces). Errors are reported on
/// stderr, never raised: this runs in `Drop`.
pub fn remove(ns: &str) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = ip(&["netns", "pids", ns]).unwrap_or_default();
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if pids.is_empty() || Instant::now() > end {
            break;
        }
        for pid in pids {
            let _ = run("kill", &["-KILL", pid], None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(e) = ip(&["netns", "del", ns]) {
        eprintln!("netns harness: cannot delete namespace {ns}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_read_from_the_name() {
        assert_eq!(owner("scfmnet-123-4-h0"), Some(123));
        assert_eq!(owner("scfmnet-123-4-br"), Some(123));
        assert_eq!(owner("other-123-4-h0"), None);
        assert_eq!(owner("scfmnet-x-4"), None);
        assert!(new_name().starts_with(&format!("{PREFIX}{}-", std::process::id())));
    }
}
