//! The libtorch this worker runs on. A worker compiled against one libtorch version and
//! run on another does not fail to start: the symbols it uses usually resolve, and the
//! operators then compute something else (once seen as `parameter count 40 != formula`).
//! [`check`] therefore compares, before anything runs, the version recorded at build time
//! (`build.rs` reads `$LIBTORCH`) with the version of the `libtorch_cpu.so` actually mapped
//! into this process (found in `/proc/self/maps`, its version read from the files of its
//! folder exactly as at build time), and refuses a mismatch with both named.

mod files;

use std::path::{Path, PathBuf};

pub use files::{read_version, release_of, version_files};

use crate::error::{Result, WorkerError};

/// The version of the libtorch this worker was compiled against (e.g. `2.11.0+cu130`).
pub const COMPILED_VERSION: &str = env!("SCFM_LIBTORCH_VERSION");

/// Where [`COMPILED_VERSION`] was read at build time.
pub const COMPILED_FROM: &str = env!("SCFM_LIBTORCH_VERSION_FROM");

/// Environment variable that turns the check off (`off`); at your own risk.
pub const CHECK_ENV: &str = "SCFM_LIBTORCH_CHECK";

/// The libtorch mapped into this process.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The mapped `libtorch_cpu.so`.
    pub library: PathBuf,
    /// Its version and the file that names it, or every file looked at.
    pub version: std::result::Result<(String, PathBuf), Vec<PathBuf>>,
}

/// The path of the mapped library named `name` in the text of `/proc/<pid>/maps`.
pub fn mapped_library(maps: &str, name: &str) -> Option<PathBuf> {
    maps.lines().find_map(|l| {
        let path = Path::new(&l[l.find('/')?..]);
        (path.file_name()? == name).then(|| path.to_path_buf())
    })
}

/// The folder of a loaded library's `lib/` folder: the libtorch root whose files name
/// its version (`torch/` of the wheel, `libtorch/` of the zip).
pub fn libtorch_root(library: &Path) -> Option<&Path> {
    library.parent()?.parent()
}

/// The `libtorch_cpu.so` mapped into this process and its version; `None` when none is
/// mapped (libtorch linked statically: then it is the compiled one).
pub fn loaded() -> Option<Loaded> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let library = mapped_library(&maps, "libtorch_cpu.so")?;
    let version = match libtorch_root(&library) {
        Some(root) => read_version(root),
        None => Err(Vec::new()),
    };
    Some(Loaded { library, version })
}

/// Compares the compiled version with the loaded one: `Ok` when their releases
/// (`major.minor.patch`) are equal (the build tag, `+cpu` or `+cu130`, may differ), else
/// the error message naming both.
pub fn compare(compiled: &str, compiled_from: &str, loaded: &Loaded) -> Result<(), String> {
    let lib = loaded.library.display();
    let fix = format!(
        "run it with libtorch {compiled} (LD_LIBRARY_PATH=<that libtorch>/lib), or rebuild \
         scfm-worker against this one (LIBTORCH=<its folder>, with the tch version made for it); \
         {CHECK_ENV}=off skips this check at your own risk"
    );
    match &loaded.version {
        Ok((v, file)) => {
            let (Some(a), Some(b)) = (release_of(compiled), release_of(v)) else {
                return Err(format!(
                    "cannot compare libtorch versions `{compiled}` (built against) and `{v}` \
                     (loaded from {lib}, read in {})",
                    file.display()
                ));
            };
            if a == b {
                Ok(())
            } else {
                Err(format!(
                    "libtorch mismatch: scfm-worker was built against libtorch {compiled} \
                     (read in {compiled_from}) but loaded libtorch {v} ({lib}, version read in \
                     {}); the two differ in their operators and would compute wrong results: {fix}",
                    file.display()
                ))
            }
        }
        Err(tried) => Err(format!(
            "cannot tell the version of the loaded libtorch {lib}: none of {} names one \
             (scfm-worker was built against libtorch {compiled}); keep the torch wheel's \
             version.py (or libtorch's build-version) in the folder above its lib/, or {fix}",
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The start-up check: an error naming both versions unless the loaded libtorch is the
/// one the worker was compiled against. Returns what was loaded (`None`: statically linked).
pub fn check() -> Result<Option<Loaded>> {
    let Some(l) = loaded() else {
        tracing::debug!(
            compiled = COMPILED_VERSION,
            "no libtorch_cpu.so mapped (static)"
        );
        return Ok(None);
    };
    match compare(COMPILED_VERSION, COMPILED_FROM, &l) {
        Ok(()) => {
            tracing::debug!(version = COMPILED_VERSION, library = %l.library.display(), "libtorch");
            Ok(Some(l))
        }
        Err(e) if std::env::var(CHECK_ENV).is_ok_and(|v| v == "off") => {
            tracing::warn!("{CHECK_ENV}=off: going on despite: {e}");
            Ok(Some(l))
        }
        Err(e) => Err(WorkerError::Libtorch(e)),
    }
}

/// The `lib/` folder of the loaded libtorch (where NCCL is looked for next to it).
pub fn loaded_lib_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    Some(
        mapped_library(&maps, "libtorch_cpu.so")?
            .parent()?
            .to_path_buf(),
    )
}

#[cfg(test)]
mod tests;
