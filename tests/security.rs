//! Who may reach a job, with real processes on 127.0.0.1: `scfm launch` refuses to listen
//! beyond loopback without a token.

use std::process::Command;
use std::time::Duration;

use scfm_tests::{TINY, bin, launch_coordinator, run_with_timeout, write_manifest};

/// `scfm launch` on a non-loopback address without a token exits at once with an error
/// that says how to set one (and listens nowhere); with a token it listens there.
#[test]
fn launch_refuses_a_non_loopback_address_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = "  max_workers: 2\n  coordinator: 0.0.0.0:0\n  join_timeout_s: 5";
    let m = write_manifest(d, &d.join("ckpt"), TINY, "  batch_size: 8", cluster);
    let out = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("launch")
            .arg(&m)
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "it must not listen"
    );
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0")
            && err.contains("the manifest has no token")
            && err.contains("token_env: SCFM_TOKEN"),
        "{err}"
    );

    let text = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, format!("{text}auth:\n  token: launch-test\n")).unwrap();
    let (mut coord, addr, _log) = launch_coordinator(&m);
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    coord.kill().unwrap();
    coord.wait().unwrap();
}
