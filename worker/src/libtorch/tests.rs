use std::path::{Path, PathBuf};

use super::*;

#[test]
fn versions_are_read_from_each_kind_of_file() {
    assert_eq!(
        files::parse_build_version("\n2.11.0+cu130\n").as_deref(),
        Some("2.11.0+cu130")
    );
    let py = "from typing import Optional\n__version__ = '2.11.0+cu130'\ndebug = False\n";
    assert_eq!(files::parse_version_py(py).as_deref(), Some("2.11.0+cu130"));
    let h = "#define TORCH_VERSION_MAJOR 2\n#define TORCH_VERSION_MINOR 11\n\
             #define TORCH_VERSION_PATCH 0\n#define TORCH_VERSION \\\n";
    assert_eq!(files::parse_version_h(h).as_deref(), Some("2.11.0"));
    assert_eq!(files::parse_build_version("garbage"), None);
    assert_eq!(release_of("2.11.0a0+git70d99e9"), Some((2, 11, 0)));
    assert_eq!(release_of("2.13"), None);
}

#[test]
fn the_first_file_that_names_a_version_wins() {
    let d = tempfile::tempdir().unwrap();
    let err = read_version(d.path()).unwrap_err();
    assert_eq!(err, version_files(d.path()));
    let h = d.path().join("include/torch/headeronly");
    std::fs::create_dir_all(&h).unwrap();
    std::fs::write(
        h.join("version.h"),
        "#define TORCH_VERSION_MAJOR 2\n#define TORCH_VERSION_MINOR 11\n#define TORCH_VERSION_PATCH 0\n",
    )
    .unwrap();
    assert_eq!(read_version(d.path()).unwrap().0, "2.11.0");
    std::fs::write(
        d.path().join("version.py"),
        "__version__ = \"2.13.0+cpu\"\n",
    )
    .unwrap();
    assert_eq!(
        read_version(d.path()).unwrap(),
        ("2.13.0+cpu".to_string(), d.path().join("version.py"))
    );
}

#[test]
fn the_mapped_libtorch_is_found_in_proc_maps() {
    let maps = "7f00-7f01 r--p 00000000 08:01 123 /usr/lib/libc.so.6\n\
                7f02-7f03 r-xp 00001000 08:01 456    /opt/my torch/lib/libtorch_cpu.so\n\
                7f04-7f05 rw-p 00000000 00:00 0 [heap]\n";
    let p = mapped_library(maps, "libtorch_cpu.so").unwrap();
    assert_eq!(p, Path::new("/opt/my torch/lib/libtorch_cpu.so"));
    assert_eq!(libtorch_root(&p), Some(Path::new("/opt/my torch")));
    assert_eq!(mapped_library(maps, "libtorch.so"), None);
}

#[test]
fn this_test_runs_on_the_libtorch_it_was_built_for() {
    let l = loaded().expect("libtorch_cpu.so is mapped");
    assert!(l.version.is_ok(), "{l:?}");
    compare(COMPILED_VERSION, COMPILED_FROM, &l).unwrap();
    assert!(check().unwrap().is_some());
}

fn loaded_as(version: Option<&str>) -> Loaded {
    Loaded {
        library: PathBuf::from("/x/torch/lib/libtorch_cpu.so"),
        version: match version {
            Some(v) => Ok((v.to_string(), PathBuf::from("/x/torch/version.py"))),
            None => Err(vec![PathBuf::from("/x/torch/build-version")]),
        },
    }
}

#[test]
fn only_the_release_must_match() {
    let c = |loaded: Option<&str>| compare("2.11.0+cu130", "/b/version.py", &loaded_as(loaded));
    c(Some("2.11.0+cu130")).unwrap();
    c(Some("2.11.0+cpu")).unwrap();
    c(Some("2.11.0")).unwrap();
    let e = c(Some("2.13.0+cu130")).unwrap_err();
    assert!(
        e.starts_with("libtorch mismatch: scfm-worker was built against libtorch 2.11.0+cu130")
            && e.contains("loaded libtorch 2.13.0+cu130 (/x/torch/lib/libtorch_cpu.so")
            && e.contains("SCFM_LIBTORCH_CHECK=off"),
        "{e}"
    );
    assert!(c(Some("2.11.1")).is_err());
    let e = c(None).unwrap_err();
    assert!(
        e.contains("cannot tell the version of the loaded libtorch /x/torch/lib/libtorch_cpu.so")
            && e.contains("/x/torch/build-version"),
        "{e}"
    );
}
