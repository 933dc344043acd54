//! Helpers shared by the unit tests that compare with Python references (anndata, scanpy).

use std::fmt::Debug;
use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Python with the references installed (`SCFM_PYTHON`, set by `.cargo/config.toml`).
pub fn python() -> String {
    std::env::var("SCFM_PYTHON").unwrap_or_else(|_| {
        panic!("SCFM_PYTHON is not set: it names the Python with scanpy/anndata (set by .cargo/config.toml, written by scripts/setup.sh)")
    })
}

/// Runs `script` (relative to the repository root) with the argument `spec`; panics with
/// its stderr when it fails.
pub fn run_script(script: &str, spec: &Path) {
    let python = python();
    let script = repo_root().join(script);
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(spec)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (SCFM_PYTHON): {e}"));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A little-endian array file as values.
pub fn read_bin<T, const N: usize>(path: &Path, from: fn([u8; N]) -> T) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .chunks_exact(N)
        .map(|c| from(c.try_into().unwrap()))
        .collect()
}

/// Asserts `got == want` element by element, naming the first difference.
pub fn same<T: PartialEq + Debug>(what: &str, name: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length of {name}");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: {name}[{i}] = {:?}, the Python reference has {:?}",
            got[i], want[i]
        );
    }
}
