//! The collective backend (`cluster.collective`) with real processes: `nccl` on workers that
//! cannot use NCCL fails the job naming why; `ring` and `auto` train (on CPU, `auto` says
//! why it took the ring).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use scfm_tests::{TINY, bin, run_with_timeout, worker_versions, write_manifest};

/// `scfm local` on `cluster_extra`; returns (success, stderr).
fn local(dir: &Path, cluster_extra: &str, timeout: Duration) -> (bool, String) {
    let training = "  batch_size: 8\n  max_steps: 4\n  eval_every: 100\n  threads: 1";
    let m = write_manifest(
        dir,
        &dir.join("ckpt"),
        TINY,
        training,
        &format!("  max_workers: 2\n{cluster_extra}"),
    );
    let out = run_with_timeout(
        Command::new(bin("scfm"))
            .arg("local")
            .arg(&m)
            .args(["--workers", "2"])
            .env("RUST_BACKTRACE", "0"),
        timeout,
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn collective_nccl_on_workers_without_nccl_fails_the_job_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, err) = local(dir.path(), "  collective: nccl", Duration::from_secs(300));
    assert!(!ok, "{err}");
    let v = worker_versions(&[]);
    let why = if v["nccl"]["feature"] == true {
        // Built with NCCL but no GPU here: CUDA is missing, and the NCCL search is named.
        "CUDA is not available to this worker"
    } else {
        "built without the `nccl` cargo feature"
    };
    assert!(
        err.contains("cluster.collective is `nccl`, but this worker cannot use NCCL")
            && err.contains(why),
        "{err}"
    );
    assert!(
        !err.contains("step 1 ") && !dir.path().join("ckpt/ckpt-000000004").exists(),
        "nothing trains: {err}"
    );
}

#[test]
fn ring_and_auto_train_and_say_which_backend_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, err) = local(dir.path(), "  collective: ring", Duration::from_secs(300));
    assert!(ok, "{err}");
    assert!(
        err.contains("collective backend: ring (cluster.collective is `ring`)"),
        "{err}"
    );
    assert!(
        !err.contains("NCCL not usable here"),
        "ring never probes NCCL: {err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (ok, err) = local(dir.path(), "", Duration::from_secs(300));
    assert!(ok, "{err}");
    assert!(
        err.contains("collective backend: ring (rank(s) 0, 1 cannot use NCCL")
            && err.contains("NCCL not usable here"),
        "{err}"
    );
}
