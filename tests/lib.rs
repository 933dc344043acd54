//! Helpers for scfm's integration tests: locate the built binaries and the real
//! datasets, and run processes with a deadline (nothing in a test waits forever).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A binary built by `cargo build --release` (scripts/test.sh builds them first).
pub fn bin(name: &str) -> PathBuf {
    // The test executable lives in target/release/deps/; binaries in target/release/.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --release --workspace` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A dataset made by scripts/setup.sh under data/.
pub fn dataset(name: &str) -> PathBuf {
    let p = repo_root().join("data").join(name);
    assert!(
        p.exists(),
        "{} is missing; run scripts/setup.sh",
        p.display()
    );
    p
}

/// Prepares the demo dataset (data/mouse10k.h5ad) into `dir/prepared` with `scfm
/// prepare` and the demo settings (configs/prepare-demo.yaml); returns its path.
pub fn prepared_dataset(dir: &Path) -> PathBuf {
    let out = dir.join("prepared");
    let o = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("prepare")
            .arg(dataset("mouse10k.h5ad"))
            .arg("--out")
            .arg(&out)
            .arg("--settings")
            .arg(repo_root().join("configs/prepare-demo.yaml")),
        Duration::from_secs(120),
    );
    assert!(
        o.status.success(),
        "scfm prepare failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Runs `cmd` to completion or kills it after `timeout` (then panics with its output).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).to_string();
            panic!("{cmd:?} did not finish within {timeout:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// JSON lines printed by `scfm-worker train --json`.
pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Lines of `stream`, read on a thread; receive them with a timeout.
pub fn lines(
    stream: impl Read + Send + 'static,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stream)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (rx, h)
}

/// Waits for `child` to exit; kills it and panics (naming `what`) after `timeout`.
pub fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &std::process::Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -TERM {} failed", child.id());
}
