//! Records the version of the libtorch the worker is compiled against
//! (`SCFM_LIBTORCH_VERSION`, read from `$LIBTORCH` as `crate::libtorch` reads the loaded
//! one at start-up), and with the `cuda` feature keeps libtorch_cuda linked: nothing in the
//! binary references its symbols, so `--as-needed` would drop it and
//! `tch::Cuda::is_available()` would stay false.

use std::path::{Path, PathBuf};

#[path = "src/libtorch/files.rs"]
#[allow(dead_code)]
mod files;

/// The version of the libtorch torch-sys builds against, and where it was read: `$LIBTORCH`
/// (as torch-sys), the Python torch with `LIBTORCH_USE_PYTORCH`, or the system's `/usr`.
fn compiled_version() -> Result<(String, String), String> {
    if let Some(root) = std::env::var_os("LIBTORCH") {
        let root = PathBuf::from(root);
        return match files::read_version(&root) {
            Ok((v, f)) => {
                println!("cargo:rerun-if-changed={}", f.display());
                Ok((v, f.display().to_string()))
            }
            Err(tried) => Err(format!(
                "LIBTORCH={} names no version in any of {tried:?}",
                root.display()
            )),
        };
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let py = if std::env::var_os("VIRTUAL_ENV").is_some() {
            "python"
        } else {
            "python3"
        };
        let out = std::process::Command::new(py)
            .args(["-c", "import torch; print(torch.__version__)"])
            .output()
            .map_err(|e| format!("cannot run {py}: {e}"))?;
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        return match files::release_of(&v) {
            Some(_) => Ok((v, format!("{py}: torch.__version__"))),
            None => Err(format!("{py} printed no torch version ({out:?})")),
        };
    }
    let usr = Path::new("/usr");
    files::read_version(usr)
        .map(|(v, f)| (v, f.display().to_string()))
        .map_err(|tried| format!("LIBTORCH is not set and none of {tried:?} names a version"))
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/libtorch/files.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    match compiled_version() {
        Ok((v, from)) => {
            println!("cargo:rustc-env=SCFM_LIBTORCH_VERSION={v}");
            println!("cargo:rustc-env=SCFM_LIBTORCH_VERSION_FROM={from}");
        }
        Err(e) => panic!("cannot tell which libtorch scfm-worker is built against: {e}"),
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
