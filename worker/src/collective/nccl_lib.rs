//! Where the NCCL library is looked for (the loading itself is in `nccl.rs`, cargo feature
//! `nccl`). The pip wheel `nvidia-nccl-cu13` (a dependency of the CUDA torch wheel) ships
//! only `libnccl.so.2`, in `site-packages/nvidia/nccl/lib/`, which the dynamic linker does
//! not search; the loaded libtorch shows where that `site-packages` is.
//!
//! Order: `$SCFM_NCCL_LIBRARY` alone when it is set (an explicit choice is never replaced
//! by another library); else `<torch>/../nvidia/nccl/lib/libnccl.so.2` and
//! `<torch>/lib/libnccl.so.2` next to the loaded libtorch; then `libnccl.so.2` and
//! `libnccl.so` through the dynamic linker's search (`LD_LIBRARY_PATH`, `ld.so.cache`,
//! the system folders).

use std::fmt;
use std::path::{Path, PathBuf};

/// Environment variable naming the NCCL library to load (a file path).
pub const NCCL_LIBRARY_ENV: &str = "SCFM_NCCL_LIBRARY";

/// One place the NCCL library is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// A file, loaded by its path when it exists.
    File(PathBuf),
    /// A file name the dynamic linker resolves through its search path.
    Name(&'static str),
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Candidate::File(p) => write!(f, "{}", p.display()),
            Candidate::Name(n) => write!(
                f,
                "{n} (dynamic linker search: LD_LIBRARY_PATH={}, ld.so.cache, system folders)",
                std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
            ),
        }
    }
}

/// The places to look for NCCL, in order: `explicit` alone when given, else the wheel's
/// places next to the libtorch whose `lib/` folder is `torch_lib`, then the dynamic
/// linker's search.
pub fn candidates(explicit: Option<&Path>, torch_lib: Option<&Path>) -> Vec<Candidate> {
    if let Some(p) = explicit {
        return vec![Candidate::File(p.to_path_buf())];
    }
    let mut v = Vec::new();
    if let Some(lib) = torch_lib {
        // site-packages/torch/lib -> site-packages/nvidia/nccl/lib
        if let Some(site) = lib.parent().and_then(Path::parent) {
            v.push(Candidate::File(site.join("nvidia/nccl/lib/libnccl.so.2")));
        }
        v.push(Candidate::File(lib.join("libnccl.so.2")));
    }
    v.push(Candidate::Name("libnccl.so.2"));
    v.push(Candidate::Name("libnccl.so"));
    v
}

/// The candidates of this process: `$SCFM_NCCL_LIBRARY`, or the places next to the loaded
/// libtorch and the dynamic linker's search.
pub fn process_candidates() -> Vec<Candidate> {
    let explicit = std::env::var_os(NCCL_LIBRARY_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    candidates(
        explicit.as_deref(),
        crate::libtorch::loaded_lib_dir().as_deref(),
    )
}

/// The first file candidate that exists (what would be loaded first, unless it fails to
/// load); `None` when only the dynamic linker's search is left.
pub fn first_existing(candidates: &[Candidate]) -> Option<&Path> {
    candidates.iter().find_map(|c| match c {
        Candidate::File(p) if p.is_file() => Some(p.as_path()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pip_wheel_layout_next_to_torch_is_searched_first() {
        let d = tempfile::tempdir().unwrap();
        let site = d.path().join("lib/python3.11/site-packages");
        let torch_lib = site.join("torch/lib");
        let nccl_dir = site.join("nvidia/nccl/lib");
        std::fs::create_dir_all(&torch_lib).unwrap();
        std::fs::create_dir_all(&nccl_dir).unwrap();
        let c = candidates(None, Some(&torch_lib));
        assert_eq!(
            c,
            vec![
                Candidate::File(nccl_dir.join("libnccl.so.2")),
                Candidate::File(torch_lib.join("libnccl.so.2")),
                Candidate::Name("libnccl.so.2"),
                Candidate::Name("libnccl.so"),
            ]
        );
        // Nothing there yet: only the dynamic linker is left.
        assert_eq!(first_existing(&c), None);
        // A library in torch/lib is found ...
        std::fs::write(torch_lib.join("libnccl.so.2"), b"fake").unwrap();
        assert_eq!(
            first_existing(&c),
            Some(torch_lib.join("libnccl.so.2").as_path())
        );
        // ... but the wheel's nvidia/nccl/lib/libnccl.so.2 comes first.
        std::fs::write(nccl_dir.join("libnccl.so.2"), b"fake").unwrap();
        assert_eq!(
            first_existing(&c),
            Some(nccl_dir.join("libnccl.so.2").as_path())
        );
        // Only the file names the wheel has count: libnccl.so in the folder is not looked at.
        assert!(
            c.iter()
                .all(|x| !matches!(x, Candidate::File(p) if p.ends_with("libnccl.so")))
        );
    }

    #[test]
    fn an_explicit_path_is_the_only_candidate() {
        let c = candidates(
            Some(Path::new("/opt/nccl/libnccl.so.2")),
            Some(Path::new("/t/lib")),
        );
        assert_eq!(c, vec![Candidate::File("/opt/nccl/libnccl.so.2".into())]);
        assert_eq!(first_existing(&c), None);
        let c = candidates(None, None);
        assert_eq!(
            c,
            vec![
                Candidate::Name("libnccl.so.2"),
                Candidate::Name("libnccl.so")
            ]
        );
        assert!(
            c[0].to_string()
                .starts_with("libnccl.so.2 (dynamic linker search")
        );
    }
}
