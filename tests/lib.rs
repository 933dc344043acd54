//! Helpers for scfm's integration tests: locate the built binaries and the real
//! datasets, and run processes with a deadline (nothing in a test waits forever).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod netns_harness;

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

/// Reports that the check `what` could not run here (`reason`): a `SKIPPED:` line on
/// stderr and, when `SCFM_SKIP_LOG` names a file (scripts/test.sh sets it), a line
/// `what<TAB>reason` appended to it, which the script counts and prints in its summary
/// and checks against the checks that must run (`SCFM_MUST_RUN`).
pub fn skip(what: &str, reason: &str) {
    eprintln!("SKIPPED: {what}: {reason}");
    if let Some(log) = std::env::var_os("SCFM_SKIP_LOG").filter(|p| !p.is_empty()) {
        let line = format!("{what}\t{}\n", reason.replace(['\n', '\t'], " "));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
        if let Err(e) = written {
            panic!(
                "cannot append to SCFM_SKIP_LOG {}: {e}",
                Path::new(&log).display()
            );
        }
    }
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

/// Waits up to `timeout` for a line of `log` containing `needle`, keeping every line seen
/// in `seen` (the panic message shows them).
pub fn wait_log(
    log: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    needle: &str,
    timeout: Duration,
) {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let line = log
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no `{needle}` within {timeout:?}:\n{}", seen.join("\n")));
        let hit = line.contains(needle);
        seen.push(line);
        if hit {
            return;
        }
    }
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

/// A real S3-compatible server (s3s-fs) on 127.0.0.1, serving `dir` (a bucket is a folder
/// in it); killed when dropped. The binary comes from `SCFM_S3S_FS` or
/// `.cache/s3s/bin/s3s-fs` (scripts/test.sh installs it).
pub struct S3Server {
    child: std::process::Child,
    /// The served directory.
    pub dir: PathBuf,
    /// Its port.
    pub port: u16,
}

impl S3Server {
    /// Access key of the test server.
    pub const KEY: &'static str = "scfmtest";
    /// Secret key of the test server.
    pub const SECRET: &'static str = "scfmtestsecret";

    /// Starts a server on a free port with bucket `bucket` and waits until it accepts.
    pub fn start(dir: &Path, bucket: &str) -> S3Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        Self::start_on(dir, bucket, port)
    }

    /// Starts a server on `port` (e.g. to restart one that was killed).
    pub fn start_on(dir: &Path, bucket: &str, port: u16) -> S3Server {
        let bin = std::env::var_os("SCFM_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".cache/s3s/bin/s3s-fs"));
        assert!(
            bin.exists(),
            "{} is missing: scripts/test.sh installs s3s-fs (cargo install s3s-fs --version 0.14.1 --features binary --locked --root .cache/s3s)",
            bin.display()
        );
        std::fs::create_dir_all(dir.join(bucket)).expect("bucket folder");
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", Self::KEY, "--secret-key", Self::SECRET])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server {
            child,
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// Environment for processes that use `s3://` URLs on this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", Self::KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", Self::SECRET.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `job.yaml` in `dir`: the demo data prepared into shards, the given model,
/// training and cluster sections (deadlines of 20 s), checkpoints at `ckpt`.
pub fn write_manifest(
    dir: &Path,
    ckpt: &Path,
    model: &str,
    training: &str,
    cluster: &str,
) -> std::path::PathBuf {
    let m = format!(
        "run_id: test\ndata:\n  path: {}\n  validation_fraction: 0.05\nmodel:\n{model}\ntraining:\n{training}\ncluster:\n  collective_timeout_s: 20\n  worker_timeout_s: 20\n{cluster}\ncheckpoint:\n  url: {}\n  every_steps: 1000\n",
        prepared_dataset(dir).display(),
        ckpt.display()
    );
    let p = dir.join("job.yaml");
    std::fs::write(&p, m).unwrap();
    p
}

/// The lines of the metrics log at `ckpt` that count: its parts (`metrics/part-*.jsonl`)
/// in order, without the lines a `rollback` discounted.
pub fn metric_steps(ckpt: &Path) -> Vec<serde_json::Value> {
    let mut parts: Vec<(u64, PathBuf)> = std::fs::read_dir(ckpt.join("metrics"))
        .unwrap_or_else(|e| panic!("{}/metrics: {e}", ckpt.display()))
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let n = scfm_common::metrics_log::part_number(&format!("metrics/{name}"))?;
            Some((n, p))
        })
        .collect();
    parts.sort();
    let mut eff = scfm_common::metrics_log::Effective::default();
    for (_, p) in parts {
        for l in std::fs::read_to_string(&p).unwrap().lines() {
            eff.push_line(l)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
    eff.into_lines()
}

/// A tiny model for cluster tests.
pub const TINY: &str = "  preset: minimal\n  hidden: 32\n  n_layers: 1\n  n_heads: 4\n  ffn_dim: 64\n  max_seq_len: 64";

/// Starts `scfm launch MANIFEST` and returns it with the address it printed and its
/// stderr lines.
pub fn launch_coordinator(
    manifest: &Path,
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    let mut cmd = Command::new(bin("scfm"));
    cmd.arg("launch").arg(manifest);
    launch_coordinator_with(cmd)
}

/// Starts a coordinator with `cmd` (an `scfm launch` command line, possibly wrapped, as in
/// [`netns_harness`]) and returns it with the address it printed and its stderr lines.
pub fn launch_coordinator_with(
    mut cmd: Command,
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    let mut coord = cmd
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (out, _reader) = lines(coord.stdout.take().unwrap());
    let (err, err_reader) = lines(coord.stderr.take().unwrap());
    let Ok(line) = out.recv_timeout(Duration::from_secs(60)) else {
        let _ = coord.kill();
        let _ = coord.wait();
        let _ = err_reader.join();
        let said: Vec<String> = err.try_iter().collect();
        panic!(
            "the coordinator printed no address ({cmd:?}):\n{}",
            said.join("\n")
        );
    };
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    (coord, addr, err)
}

/// Runs the shell command line `cmd` with a real, nearly full disk: a tmpfs of `size_kb`
/// KiB mounted on `disk` in a private mount namespace (`unshare --map-root-user --mount`);
/// afterwards everything on it is copied to `saved` (the tmpfs vanishes with the
/// namespace). `None` (after saying so on stderr) where namespaces or mounts are not
/// allowed, so the caller skips.
pub fn run_on_small_disk(
    disk: &Path,
    size_kb: u64,
    cmd: &str,
    saved: &Path,
    timeout: Duration,
) -> Option<Output> {
    std::fs::create_dir_all(disk).expect("mount point");
    std::fs::create_dir_all(saved).expect("copy target");
    let script = format!(
        "mount -t tmpfs -o size={size_kb}k scfm-small-disk '{disk}' || exit 97\n\
         {cmd}\nrc=$?\n\
         cp -a '{disk}/.' '{saved}/' || exit 98\n\
         exit $rc\n",
        disk = disk.display(),
        saved = saved.display(),
    );
    let out = run_with_timeout(
        Command::new("unshare")
            .args(["--map-root-user", "--mount", "sh", "-c"])
            .arg(&script),
        timeout,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(97) || err.contains("unshare failed") {
        skip(
            "full-disk",
            &format!("cannot mount a size-limited tmpfs here: {err}"),
        );
        return None;
    }
    assert_ne!(out.status.code(), Some(98), "copying the disk out: {err}");
    Some(out)
}

/// Trains a tiny model (the presets' objectives, width 32) for `steps` steps on `data` (an
/// input file or a prepared dataset) with `scfm-worker train`; returns the run directory
/// `dir/run`.
pub fn train_tiny_model(dir: &Path, data: &Path, steps: u64) -> PathBuf {
    let run = dir.join("run");
    let cfg = dir.join("train.yaml");
    std::fs::write(
        &cfg,
        format!(
            "data:\n  path: {}\nmodel:\n  preset: minimal\n  hidden: 32\n  n_layers: 1\n  n_heads: 2\n  ffn_dim: 64\n  max_seq_len: 128\ntraining:\n  batch_size: 16\n  max_steps: {steps}\n  warmup_steps: 1\n  eval_every: 1000\n  threads: 1\n  device: cpu\ncheckpoint:\n  url: {}\n  every_steps: 1000\n",
            data.display(),
            run.display()
        ),
    )
    .expect("write the training file");
    let o = run_with_timeout(
        Command::new(bin("scfm-worker"))
            .args(["train", "--config"])
            .arg(&cfg),
        Duration::from_secs(600),
    );
    assert!(
        o.status.success(),
        "training the tiny model failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    run
}

/// `scfm-worker versions --json`, with `env` added.
pub fn worker_versions(env: &[(&str, &Path)]) -> serde_json::Value {
    let mut cmd = Command::new(bin("scfm-worker"));
    cmd.args(["versions", "--json"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("versions --json prints JSON")
}

/// Per committed step `(offset, step_cells, world_size, ranks)`, the MGEM loss per step,
/// and the world sizes seen, from the coordinator's metrics log of a job with `batch`
/// cells per worker and step; asserts that the workers that reported a step agree on its
/// place in the data stream and its size, that ranks are distinct and in range, and that
/// the steps tile the stream from 0 without gap or overlap.
#[allow(clippy::type_complexity)]
pub fn accounting(
    lines: &[serde_json::Value],
    batch: u64,
) -> (
    BTreeMap<u64, (u64, u64, u64, BTreeSet<u64>)>,
    BTreeMap<u64, f64>,
    BTreeSet<u64>,
) {
    let mut steps: BTreeMap<u64, (u64, u64, u64, BTreeSet<u64>)> = BTreeMap::new();
    let mut mgem: BTreeMap<u64, f64> = BTreeMap::new();
    for l in lines.iter().filter(|l| l["event"] == "step") {
        let step = l["step"].as_u64().unwrap();
        let key = (
            l["offset"].as_u64().unwrap(),
            l["step_cells"].as_u64().unwrap(),
            l["world_size"].as_u64().unwrap(),
        );
        let e = steps
            .entry(step)
            .or_insert((key.0, key.1, key.2, BTreeSet::new()));
        assert_eq!((e.0, e.1, e.2), key, "step {step} reported differently");
        assert!(
            e.3.insert(l["rank"].as_u64().unwrap()),
            "rank twice in step {step}"
        );
        mgem.insert(step, l["mgem"].as_f64().unwrap());
    }
    let last = *steps.keys().last().unwrap();
    assert_eq!(
        steps.keys().copied().collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    let mut next = 0;
    let mut worlds = BTreeSet::new();
    for (step, (offset, cells, world, ranks)) in &steps {
        assert_eq!(
            *offset, next,
            "step {step} starts at {offset}, expected {next}"
        );
        assert_eq!(*cells, batch * world);
        assert!(ranks.iter().all(|r| r < world));
        worlds.insert(*world);
        next = offset + cells;
    }
    (steps, mgem, worlds)
}

/// `(generation, world size)` of each new generation, from the coordinator's events.
pub fn generations(lines: &[serde_json::Value]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter(|l| l["event"] == "generation")
        .map(|l| {
            (
                l["generation"].as_u64().unwrap(),
                l["world_size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Makes `ca.pem`, and `server.pem` with `server.key` for `localhost` and 127.0.0.1 signed
/// by it, in `d` (RSA 2048, with openssl; every command with a deadline).
pub fn make_certificates(d: &Path) {
    let sh = |args: &str| {
        let out = run_with_timeout(
            Command::new("sh").arg("-c").arg(args).current_dir(d),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "{args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=scfm-test-ca",
    );
    sh(
        "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost",
    );
    sh(
        "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > ext.cnf && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 -extfile ext.cnf",
    );
}
