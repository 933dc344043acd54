//! Helpers of the scanpy comparisons: running `scanpy_reference.py`, reading its raw
//! little-endian arrays, and collecting mismatches.

use std::path::{Path, PathBuf};

pub(super) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the reference script for `case` on `data`; returns the directory of its outputs.
pub(super) fn reference(case: &str, data: &Path) -> tempfile::TempDir {
    let python = std::env::var("SCFM_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SCFM_PYTHON is not set: it names the Python with scanpy and scikit-misc \
             (set by .cargo/config.toml, written by scripts/setup.sh)"
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/data/preprocess/tests/scanpy_reference.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(case)
        .arg(data)
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (SCFM_PYTHON): {e}"));
    assert!(
        out.status.success(),
        "{} {case} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn read<const N: usize, T>(dir: &Path, name: &str, from: fn([u8; N]) -> T) -> Vec<T> {
    let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    bytes
        .chunks_exact(N)
        .map(|c| from(c.try_into().unwrap()))
        .collect()
}
pub(super) fn f32s(dir: &Path, name: &str) -> Vec<f32> {
    read(dir, name, f32::from_le_bytes)
}
pub(super) fn f64s(dir: &Path, name: &str) -> Vec<f64> {
    read(dir, name, f64::from_le_bytes)
}
pub(super) fn usizes(dir: &Path, name: &str) -> Vec<usize> {
    read(dir, name, i64::from_le_bytes)
        .into_iter()
        .map(|v| v as usize)
        .collect()
}
pub(super) fn flags(dir: &Path, name: &str) -> Vec<bool> {
    read(dir, name, |b: [u8; 1]| b[0] != 0)
}

/// Collects mismatches so that one run reports all of them.
#[derive(Default)]
pub(super) struct Report(Vec<String>);

impl Report {
    /// `got` equals `want` element-wise within `tol` (`|got - want| <= tol * max(1, |want|)`:
    /// relative above 1, absolute below; `tol = 0`: equal values; NaN equals NaN). Prints
    /// the largest such error when `tol > 0`.
    pub(super) fn close<T: Copy + Into<f64> + std::fmt::Debug>(
        &mut self,
        what: &str,
        got: &[T],
        want: &[T],
        tol: f64,
    ) {
        if got.len() != want.len() {
            return self.0.push(format!(
                "{what}: {} values, scanpy has {}",
                got.len(),
                want.len()
            ));
        }
        let err = |i: usize| {
            let (g, w): (f64, f64) = (got[i].into(), want[i].into());
            if g == w || (g.is_nan() && w.is_nan()) {
                0.0
            } else {
                (g - w).abs() / w.abs().max(1.0)
            }
        };
        let bad: Vec<usize> = (0..got.len())
            .filter(|&i| err(i).is_nan() || err(i) > tol)
            .collect();
        if tol > 0.0 {
            let max = (0..got.len()).map(err).fold(0.0, f64::max);
            eprintln!("{what}: largest error {max:.2e} (tolerance {tol:e})");
        }
        if let Some(&i) = bad.first() {
            self.0.push(format!(
                "{what}: {} of {} differ beyond {tol:e}; first [{i}]: {:?} vs scanpy {:?}",
                bad.len(),
                got.len(),
                got[i],
                want[i]
            ));
        }
    }

    pub(super) fn same<T: PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        got: &[T],
        want: &[T],
    ) {
        if got != want {
            let i = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]);
            self.0.push(format!(
                "{what}: differs (lengths {} vs scanpy {}; first difference at {i:?})",
                got.len(),
                want.len()
            ));
        }
    }

    /// Records a mismatch found by the caller.
    pub(super) fn fail(&mut self, message: String) {
        self.0.push(message);
    }

    pub(super) fn finish(self, case: &str) {
        assert!(
            self.0.is_empty(),
            "{case} differs from scanpy:\n  {}",
            self.0.join("\n  ")
        );
    }
}

/// Largest difference in units in the last place between two equally long f32 slices.
pub(super) fn max_ulps(a: &[f32], b: &[f32]) -> u32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.to_bits() as i64 - y.to_bits() as i64).unsigned_abs() as u32)
        .max()
        .unwrap_or(0)
}

/// The two selections are equally large and differ only among genes whose score equals
/// the lowest selected score (ties at the cut); prints the overlap.
pub(super) fn same_up_to_ties(got: &[bool], want: &[bool], score: &[f64]) -> Result<(), String> {
    let count = |m: &[bool]| m.iter().filter(|&&b| b).count();
    if got.len() != want.len() || count(got) != count(want) {
        return Err(format!("{} selected vs scanpy {}", count(got), count(want)));
    }
    let cut = (0..score.len())
        .filter(|&i| want[i])
        .map(|i| score[i])
        .fold(f64::INFINITY, f64::min);
    let both = (0..got.len()).filter(|&i| got[i] && want[i]).count();
    let tied = score.iter().filter(|&&s| s == cut).count();
    eprintln!(
        "seurat_v3: {both} of {} genes as scanpy; {tied} genes tie at the cut {cut}",
        count(want)
    );
    match (0..got.len()).find(|&i| got[i] != want[i] && score[i] != cut) {
        Some(i) => Err(format!(
            "gene {i} (score {}) differs and is not tied at the cut {cut}",
            score[i]
        )),
        None => Ok(()),
    }
}
