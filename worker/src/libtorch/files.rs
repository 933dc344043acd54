//! The version of a libtorch folder, read from its files. Shared by `build.rs` (the
//! libtorch the worker is compiled against) and `crate::libtorch` (the one it loaded), so
//! both read it the same way. Standard library only.

use std::path::{Path, PathBuf};

/// The files that may name a libtorch folder's version, in the order they are read:
/// `build-version` (the libtorch zip), `version.py` (the torch wheel's `torch/` folder),
/// then the C++ headers (both layouts).
pub fn version_files(root: &Path) -> Vec<PathBuf> {
    vec![
        root.join("build-version"),
        root.join("version.py"),
        root.join("include/torch/headeronly/version.h"),
        root.join("include/torch/csrc/api/include/torch/version.h"),
    ]
}

/// The version of the libtorch folder `root` (holding `lib/`): `Ok((version, file))`, or
/// `Err(files looked at)` when none of [`version_files`] names one.
pub fn read_version(root: &Path) -> Result<(String, PathBuf), Vec<PathBuf>> {
    let files = version_files(root);
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let v = match name {
            "build-version" => parse_build_version(&text),
            "version.py" => parse_version_py(&text),
            _ => parse_version_h(&text),
        };
        if let Some(v) = v {
            return Ok((v, f.clone()));
        }
    }
    Err(files)
}

/// `2.11.0+cu130` from a `build-version` file (its first non-empty line).
pub fn parse_build_version(text: &str) -> Option<String> {
    let v = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    release_of(v).map(|_| v.to_string())
}

/// `2.11.0+cu130` from the line `__version__ = '2.11.0+cu130'` of torch's `version.py`.
pub fn parse_version_py(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("__version__")?.trim_start();
        let rest = rest.strip_prefix('=')?.trim();
        let v = rest.trim_matches(|c| c == '\'' || c == '"');
        release_of(v).map(|_| v.to_string())
    })
}

/// `2.11.0` from the `TORCH_VERSION_MAJOR`, `_MINOR` and `_PATCH` defines of `version.h`.
pub fn parse_version_h(text: &str) -> Option<String> {
    let num = |name: &str| {
        text.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("#define") && it.next() == Some(name))
                .then(|| it.next()?.parse::<u32>().ok())
                .flatten()
        })
    };
    Some(format!(
        "{}.{}.{}",
        num("TORCH_VERSION_MAJOR")?,
        num("TORCH_VERSION_MINOR")?,
        num("TORCH_VERSION_PATCH")?
    ))
}

/// The release part `major.minor.patch` of a version such as `2.11.0+cu130` or
/// `2.11.0a0+git1234` (`None` when it does not start with three numbers).
pub fn release_of(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.trim().splitn(3, '.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    let rest = it.next()?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let patch = rest[..end].parse().ok()?;
    Some((major, minor, patch))
}
