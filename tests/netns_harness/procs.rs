//! Processes in the hosts of a [`Net`]: a coordinator (`scfm launch`) and workers
//! (`scfm-worker join --bind HOST_ADDRESS`), each a [`Proc`] that can be paused, resumed
//! and killed, and is killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use super::Net;
use super::setup;

/// The token of the jobs the harness runs: a coordinator that listens beyond loopback
/// refuses to start without one.
pub const TOKEN: &str = "scfm-netns-harness-token";

/// A process started in a host of a net; killed (and reaped) when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// What it is, for messages (`coordinator`, `worker 2`, …).
    pub what: String,
    /// Its stderr, when it goes to a file.
    pub log: Option<PathBuf>,
}

impl Proc {
    /// Its pid (the program's own: `ip netns exec` replaced itself with it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        if let Err(e) = setup::run("kill", &[&format!("-{sig}"), &self.pid().to_string()], None) {
            panic!("kill -{sig} {} ({}): {e}", self.pid(), self.what);
        }
    }

    /// Stops it (SIGSTOP): its sockets stay open, it answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Asks it to stop (SIGTERM: a preemption for scfm's processes).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Its exit status if it has exited (reaped), else `None`; does not wait.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for it to exit; kills it and panics after that.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        crate::wait_exit(&mut self.child, timeout, &self.what)
    }

    /// Its stderr log so far (empty without one).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The parameter fingerprint a worker logged when it finished (`worker done: …, parameter
/// fingerprint X`), if it did.
pub fn fingerprint(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.split("parameter fingerprint ").nth(1))
        .map(|f| f.trim().to_string())
}

impl Net {
    /// Starts `scfm launch MANIFEST` in host `i` (the manifest's `cluster.coordinator`
    /// must be that host's address); returns it with the address it printed and its
    /// stderr lines.
    pub fn launch_coordinator(
        &self,
        i: usize,
        manifest: &Path,
    ) -> (Proc, String, Receiver<String>) {
        let mut cmd = self.command(i, crate::bin("scfm"));
        cmd.arg("launch").arg(manifest);
        let (child, addr, log) = crate::launch_coordinator_with(cmd);
        let proc = Proc {
            child,
            what: format!("coordinator in {}", self.host(i).ns),
            log: None,
        };
        (proc, addr, log)
    }

    /// Starts `scfm-worker join` in host `i`, its ring socket bound to the host's address,
    /// joining the coordinator at `addr` (`host:port`) with [`TOKEN`]; its stderr goes to
    /// `log`.
    pub fn join_worker(&self, i: usize, addr: &str, log: &Path) -> Proc {
        let child = self
            .command(i, crate::bin("scfm-worker"))
            .args(["join", "--coordinator", &format!("http://{addr}")])
            .args(["--bind", &self.host(i).ip.to_string()])
            .env("SCFM_TOKEN", TOKEN)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("worker log"))
            .spawn()
            .expect("spawn a worker");
        Proc {
            child,
            what: format!("worker in {}", self.host(i).ns),
            log: Some(log.to_path_buf()),
        }
    }
}
