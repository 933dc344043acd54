//! A worker that loads another libtorch than the one it was built against refuses to start,
//! naming both versions (a real process on a real libtorch whose version file says
//! otherwise; a folder without a version file is refused too).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use scfm_tests::{bin, run_with_timeout, worker_versions};

/// A libtorch folder laid out like the torch wheel's (`torch/lib/*`, `torch/version.py`)
/// made of hard links to the real libraries (so that the dynamic linker maps files from
/// this folder), whose `version.py` says `version`; `None` when hard links cannot be made
/// (another file system).
fn libtorch_copy(at: &Path, real_lib: &Path, version: Option<&str>) -> Option<PathBuf> {
    let root = at.join("site-packages/torch");
    let lib = root.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    for e in std::fs::read_dir(real_lib).unwrap() {
        let e = e.unwrap();
        let to = lib.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            continue;
        }
        if std::fs::hard_link(e.path(), &to).is_err() {
            return None;
        }
    }
    // libtorch's RPATH ($ORIGIN/../../nvidia/...) finds the wheel's other libraries.
    let site = real_lib.parent().and_then(Path::parent).unwrap();
    for d in ["nvidia", "torch.libs"] {
        if site.join(d).exists() {
            std::os::unix::fs::symlink(site.join(d), at.join("site-packages").join(d)).unwrap();
        }
    }
    if let Some(v) = version {
        std::fs::write(root.join("version.py"), format!("__version__ = '{v}'\n")).unwrap();
    }
    Some(lib)
}

#[test]
fn a_worker_on_another_libtorch_refuses_to_start_naming_both_versions() {
    let real = worker_versions(&[]);
    let compiled = real["libtorch"]["compiled"].as_str().unwrap().to_string();
    let loaded = PathBuf::from(real["libtorch"]["loaded"].as_str().unwrap());
    assert_eq!(real["libtorch"]["error"], serde_json::Value::Null, "{real}");
    let real_lib = loaded.parent().unwrap();
    // Next to target/ (the same file system as the build's libtorch, for hard links).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cases = [
        ("other", Some("2.99.0+fake")),
        ("same", Some(compiled.as_str())),
        ("unknown", None),
    ];
    for (name, version) in cases {
        let Some(lib) = libtorch_copy(&dir.path().join(name), real_lib, version) else {
            scfm_tests::skip(
                "libtorch-mismatch",
                &format!(
                    "cannot hard-link {} into {} (another file system)",
                    real_lib.display(),
                    dir.path().display()
                ),
            );
            return;
        };
        let env = [("LD_LIBRARY_PATH", lib.as_path())];
        // LD_LIBRARY_PATH comes before the binary's RUNPATH: the copy is what is mapped.
        let v = worker_versions(&env);
        assert_eq!(
            v["libtorch"]["loaded"].as_str(),
            Some(lib.join("libtorch_cpu.so").to_str().unwrap()),
            "{v}"
        );
        let out = run_with_timeout(
            Command::new(bin("scfm-worker"))
                .args(["train", "--config", "/nonexistent/train.yaml"])
                .env("LD_LIBRARY_PATH", &lib)
                .env("RUST_BACKTRACE", "0"),
            Duration::from_secs(60),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        match version {
            Some("2.99.0+fake") => assert!(
                err.contains(&format!(
                    "libtorch mismatch: scfm-worker was built against libtorch {compiled}"
                )) && err.contains(&format!(
                    "but loaded libtorch 2.99.0+fake ({}",
                    lib.join("libtorch_cpu.so").display()
                )),
                "{err}"
            ),
            // The same version: the check passes and the missing file is the error.
            Some(_) => assert!(
                err.contains("/nonexistent/train.yaml") && !err.contains("libtorch"),
                "{err}"
            ),
            None => assert!(
                err.contains("cannot tell the version of the loaded libtorch")
                    && err.contains("version.py"),
                "{err}"
            ),
        }
        // The escape hatch is explicit: with it, only the missing file is left.
        if version != Some(compiled.as_str()) {
            let out = run_with_timeout(
                Command::new(bin("scfm-worker"))
                    .args(["train", "--config", "/nonexistent/train.yaml"])
                    .env("LD_LIBRARY_PATH", &lib)
                    .env("SCFM_LIBTORCH_CHECK", "off"),
                Duration::from_secs(60),
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("SCFM_LIBTORCH_CHECK=off: going on despite")
                    && err.contains("/nonexistent/train.yaml"),
                "{err}"
            );
        }
    }
}
