//! The workers' ring over TLS (`auth.tls.ring`) with real processes on 127.0.0.1 and
//! certificates made with openssl as in `tests/cluster.rs`: a two-worker job trains to its
//! end over a TLS ring, and a worker not given the ring's certificate is refused naming the
//! flag. Every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use scfm_tests::{
    TINY, bin, launch_coordinator, make_certificates, run_with_timeout, write_manifest,
};

/// A two-worker job manifest in `d` whose gRPC and ring both run over TLS.
fn tls_ring_manifest(d: &Path, steps: u64) -> PathBuf {
    make_certificates(d);
    let training =
        format!("  batch_size: 8\n  max_steps: {steps}\n  eval_every: 100\n  threads: 1");
    let m = write_manifest(d, &d.join("ckpt"), TINY, &training, "  max_workers: 2");
    let mut text = std::fs::read_to_string(&m).unwrap();
    text.push_str(
        "auth:\n  token: ring-tls-test\n  tls: {cert: server.pem, key: server.key, ca: ca.pem, domain: localhost, ring: true}\n",
    );
    std::fs::write(&m, text).unwrap();
    m
}

/// `scfm local` with `auth.tls.ring: true`: both workers form their ring over TLS 1.3
/// (each logs `ring: TLS 1.3 …` for the generation) and the job trains to its end.
#[test]
fn a_job_trains_over_a_tls_ring() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = tls_ring_manifest(d, 3);
    let out = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("local")
            .arg(&m)
            .args(["--workers", "2"])
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(600),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scfm local failed:\n{err}");
    assert!(err.contains("https://127.0.0.1:"), "{err}");
    let tls_lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("ring: TLS 1.3"))
        .collect();
    assert_eq!(tls_lines.len(), 2, "one line per worker expected:\n{err}");
    for rank in [0, 1] {
        assert!(
            tls_lines
                .iter()
                .any(|l| l.contains(&format!("rank={rank}"))),
            "no TLS ring line of rank {rank}:\n{err}"
        );
    }
    assert!(!err.contains("refused a ring connection"), "{err}");
    assert!(d.join("ckpt/ckpt-000000003/model.safetensors").exists());
}

/// A worker that joins a job whose ring runs over TLS without `--ring-tls-cert`, or with
/// one that cannot be read, exits with an error naming the flag.
#[test]
fn a_worker_without_the_ring_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = tls_ring_manifest(d, 3);
    let (mut coord, addr, _log) = launch_coordinator(&m);
    let join = |extra: &[&str]| {
        let out = run_with_timeout(
            Command::new(bin("scfm-worker"))
                .args(["join", "--bind", "127.0.0.1", "--coordinator"])
                .arg(format!("https://{addr}"))
                .arg("--tls-ca")
                .arg(d.join("ca.pem"))
                .args(["--tls-domain", "localhost"])
                .args(extra)
                .env("SCFM_TOKEN", "ring-tls-test")
                .env("RUST_BACKTRACE", "0")
                .stdin(Stdio::null()),
            Duration::from_secs(120),
        );
        assert!(!out.status.success(), "the worker was not refused");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = join(&[]);
    assert!(
        err.contains("--ring-tls-cert") && err.contains("auth.tls.ring"),
        "{err}"
    );
    let key = d.join("server.key");
    let missing = d.join("missing.pem");
    let err = join(&[
        "--ring-tls-cert",
        missing.to_str().unwrap(),
        "--ring-tls-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--ring-tls-cert")
            && err.contains("cannot read")
            && err.contains("missing.pem"),
        "{err}"
    );
    let _ = coord.kill();
    let _ = coord.wait();
}
