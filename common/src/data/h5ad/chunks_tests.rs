//! The raw-chunk path gives exactly what libhdf5's hyperslab reads give: on the
//! repository's real files and on files written here by Python (anndata and h5py) with
//! each filter pipeline the path handles or declines; a damaged chunk is an error.

use std::path::{Path, PathBuf};

use super::super::rows::H5adRows;
use super::super::typed::Src;
use super::super::{MatrixSource, open};
use super::RawCsr;
use crate::data::CsrMatrix;
use crate::testutil::{python, repo_root};

/// The fast and the libhdf5-only reader of `source` in `path`; checks which datasets the
/// fast path reads.
fn readers(path: &Path, source: &MatrixSource, expect: (bool, bool)) -> (H5adRows, H5adRows) {
    let open = || H5adRows::open(path, source).unwrap().expect("a CSR matrix");
    let fast = open();
    assert_eq!(
        fast.raw_chunks(),
        expect,
        "{}: raw-chunk path",
        path.display()
    );
    (fast, open().without_raw_chunks())
}

/// Asserts that both readers give the same rows `a..b`, bit for bit.
fn same_rows(fast: &H5adRows, slow: &H5adRows, a: usize, b: usize) {
    let what = format!("{} rows {a}..{b}", fast.matrix_name());
    let (x, y): (CsrMatrix, CsrMatrix) = (fast.read(a, b).unwrap(), slow.read(a, b).unwrap());
    assert_eq!((x.n_rows, x.n_cols), (y.n_rows, y.n_cols), "{what}: shape");
    assert_eq!(x.indptr, y.indptr, "{what}: indptr");
    assert_eq!(x.indices, y.indices, "{what}: indices");
    let bits = |m: &CsrMatrix| m.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&x), bits(&y), "{what}: data");
}

/// Compares the two readers on single rows, empty ranges, the last row, the whole matrix,
/// consecutive blocks of several sizes, and rows around the boundaries of `chunk`-element
/// chunks (every `stride`-th single row).
fn compare(fast: &H5adRows, slow: &H5adRows, chunk: usize, stride: usize) {
    let n = fast.n_rows();
    assert!(n > 0);
    for r in (0..n).step_by(stride).chain([n - 1]) {
        same_rows(fast, slow, r, r + 1);
    }
    for r in [0, n / 2, n] {
        same_rows(fast, slow, r, r);
    }
    same_rows(fast, slow, 0, n);
    for size in [7, 100, 1000] {
        for a in (0..n).step_by(size) {
            same_rows(fast, slow, a, (a + size).min(n));
        }
    }
    // The row holding element k·chunk (first row whose end passes it), with neighbours.
    let total = fast.nnz(0, n);
    let mut r = 0;
    for e in (chunk..total).step_by(chunk) {
        while fast.nnz(0, r + 1) <= e {
            r += 1;
        }
        same_rows(fast, slow, r.saturating_sub(1), (r + 2).min(n));
        same_rows(fast, slow, r, r + 1);
    }
}

/// The chunk length of dataset `name` of `path`.
fn chunk_len(path: &Path, name: &str) -> usize {
    let f = open(path).unwrap();
    f.dataset(name).unwrap().chunk().expect("chunked")[0]
}

#[test]
fn real_files_match_libhdf5() {
    let data = repo_root().join("data");
    for (file, source, group) in [
        ("mouse10k.h5ad", MatrixSource::X, "X"),
        ("pbmc68k_reduced.h5ad", MatrixSource::Raw, "raw.X"),
    ] {
        let path = data.join(file);
        let (fast, slow) = readers(&path, &source, (true, true));
        let chunk = chunk_len(&path, &format!("{group}/data"));
        compare(&fast, &slow, chunk, 13);
    }
}

#[test]
fn element_ranges_match_libhdf5() {
    let path = repo_root().join("data/mouse10k.h5ad");
    let f = open(&path).unwrap();
    let (indices, data) = (
        f.dataset("X/indices").unwrap(),
        f.dataset("X/data").unwrap(),
    );
    let raw = RawCsr::open(&indices, &data);
    assert_eq!(raw.active(), (true, true));
    let (len, cl) = (data.size(), data.chunk().unwrap()[0]);
    let mut ranges = vec![
        (0, 0),
        (0, 1),
        (0, len),
        (len - 1, len),
        (len, len),
        (cl, 2 * cl),
    ];
    for k in 1..len / cl {
        ranges.extend([
            (k * cl - 1, k * cl + 1),
            (k * cl - 3, k * cl),
            (k * cl, k * cl + 5),
        ]);
    }
    ranges.extend([(cl / 2, 3 * cl + 7), (len - cl - 10, len)]);
    for (lo, hi) in ranges {
        let (i, d) = raw.read(lo, hi, 1 << 32).unwrap();
        let want_i = Src::dataset(&indices)
            .slice(lo, hi)
            .unwrap()
            .ints::<u32>()
            .unwrap();
        let want_d = Src::dataset(&data).slice(lo, hi).unwrap().f32s().unwrap();
        assert_eq!(i.unwrap(), want_i, "indices {lo}..{hi}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&d.unwrap()), bits(&want_d), "data {lo}..{hi}");
    }
}

/// Writes the test files of [`python_files_match_libhdf5`] into `dir`: anndata with each
/// compression, then copies whose `X/indices` and `X/data` are rewritten by h5py with
/// other pipelines, types and (small) chunk sizes.
const WRITE: &str = r#"
import sys
import numpy as np, pandas as pd, scipy.sparse as sp, anndata as ad, h5py
d = sys.argv[1]
rng = np.random.default_rng(7)
n, g = 400, 300
dens = rng.random(n) * 0.2
dens[::17] = 0
X = sp.csr_matrix(rng.integers(1, 50, size=(n, g)).astype(np.float32) * (rng.random((n, g)) < dens[:, None]))
a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
               var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
a.write_h5ad(f"{d}/gzip.h5ad", compression="gzip")
a.write_h5ad(f"{d}/lzf.h5ad", compression="lzf")
a.write_h5ad(f"{d}/none.h5ad")
def redo(name, indices=X.indices, data=X.data, **kw):
    a.write_h5ad(f"{d}/{name}.h5ad")
    with h5py.File(f"{d}/{name}.h5ad", "r+") as f:
        for key, arr in (("indices", indices), ("data", data)):
            del f["X"][key]
            f["X"].create_dataset(key, data=arr, **kw)
noise = np.frombuffer(rng.bytes(4 * X.nnz), dtype=np.uint32).copy()
redo("shuffle_gzip", shuffle=True, compression="gzip", chunks=(97,))
redo("wide", indices=X.indices.astype(np.int64), data=X.data.astype(np.float64), compression="gzip", chunks=(50,))
redo("shuffle_lzf_int", data=X.data.astype(np.int32), shuffle=True, compression="lzf", chunks=(64,))
redo("noise_gzip", data=noise, compression="gzip", chunks=(100,))
redo("noise_lzf", data=noise, compression="lzf", chunks=(100,))
redo("unfiltered_chunks", chunks=(100,))
redo("fletcher", compression="gzip", fletcher32=True, chunks=(100,))
redo("big_endian", data=X.data.astype(">f4"), compression="gzip", chunks=(100,))
# Bad column indices: one past the last column, and a negative one.
bad = X.indices.copy(); bad[len(bad) // 2] = g
redo("col_too_big", indices=bad, compression="gzip", chunks=(100,))
bad = X.indices.copy(); bad[len(bad) // 3] = -1
redo("negative", indices=bad, compression="gzip", chunks=(100,))
# Only the chunks of the first half are allocated; the rest reads as the fill value 0.
a.write_h5ad(f"{d}/unallocated.h5ad")
with h5py.File(f"{d}/unallocated.h5ad", "r+") as f:
    for key, arr in (("indices", X.indices), ("data", X.data)):
        del f["X"][key]
        ds = f["X"].create_dataset(key, shape=arr.shape, dtype=arr.dtype, chunks=(100,), compression="gzip")
        ds[: len(arr) // 2] = arr[: len(arr) // 2]
"#;

/// Runs [`WRITE`] into a new temporary directory.
fn python_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(python())
        .args(["-c", WRITE])
        .arg(dir.path())
        .output()
        .expect("run SCFM_PYTHON");
    assert!(
        out.status.success(),
        "writing test files failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// How many chunks of `name` in `path` were stored with a filter skipped.
fn masked_chunks(path: &Path, name: &str) -> usize {
    let ds = open(path).unwrap().dataset(name).unwrap();
    (0..ds.num_chunks().unwrap())
        .filter(|&i| ds.chunk_info(i).unwrap().filter_mask != 0)
        .count()
}

#[test]
fn python_files_match_libhdf5() {
    let dir = python_files();
    let file = |name: &str| -> PathBuf { dir.path().join(format!("{name}.h5ad")) };
    for (name, expect) in [
        ("gzip", (true, true)),
        ("lzf", (true, true)),
        ("none", (false, false)),
        ("shuffle_gzip", (true, true)),
        ("wide", (true, true)),
        ("shuffle_lzf_int", (true, true)),
        ("noise_gzip", (true, true)),
        ("noise_lzf", (true, true)),
        ("unfiltered_chunks", (false, false)),
        ("fletcher", (false, false)),
        ("big_endian", (true, false)),
        ("unallocated", (true, true)),
    ] {
        let path = file(name);
        let (fast, slow) = readers(&path, &MatrixSource::X, expect);
        let chunk = if name == "none" {
            1000
        } else {
            chunk_len(&path, "X/data")
        };
        compare(&fast, &slow, chunk, 1);
    }
    // h5py's LZF filter declines incompressible chunks, which are then stored unfiltered
    // with the filter's bit set in the mask (libhdf5's deflate stores them deflated).
    assert!(masked_chunks(&file("noise_lzf"), "X/data") > 0);
    let ds = open(&file("unallocated"))
        .unwrap()
        .dataset("X/data")
        .unwrap();
    assert!(ds.num_chunks().unwrap() < ds.size().div_ceil(100));
    // Bad column indices give the same error either way.
    for (name, want) in [
        (
            "col_too_big",
            "has column index 300, but the matrix has 300 columns",
        ),
        ("negative", "has value -1 out of range"),
    ] {
        let (fast, slow) = readers(&file(name), &MatrixSource::X, (true, true));
        let n = fast.n_rows();
        let (x, y) = (fast.read(0, n).unwrap_err(), slow.read(0, n).unwrap_err());
        assert_eq!(x.to_string(), y.to_string(), "{name}");
        assert!(
            x.to_string().contains(&format!("`X/indices` {want}")),
            "{x}"
        );
    }
}

#[test]
fn damaged_chunk_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.h5ad");
    std::fs::copy(repo_root().join("data/mouse10k.h5ad"), &path).unwrap();
    let (addr, size, cl) = {
        let ds = open(&path).unwrap().dataset("X/data").unwrap();
        let info = ds.chunk_info(5).unwrap();
        (
            info.addr as usize,
            info.size as usize,
            ds.chunk().unwrap()[0],
        )
    };
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[addr + size / 2..addr + size / 2 + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, bytes).unwrap();
    let rows = H5adRows::open(&path, &MatrixSource::X).unwrap().unwrap();
    assert_eq!(rows.raw_chunks(), (true, true));
    // Rows `r..r+1` holding element 5.5 chunks in.
    let e = 5 * cl + cl / 2;
    let r = (0..rows.n_rows())
        .find(|&r| rows.nnz(0, r + 1) > e)
        .unwrap();
    for (a, b) in [(r, r + 1), (0, rows.n_rows())] {
        let err = rows.read(a, b).expect_err("a damaged chunk").to_string();
        println!("{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("`X/data`") && err.contains("chunk 5"), "{err}");
    }
    // Chunks before it are still read.
    let ok = (0..rows.n_rows())
        .find(|&r| rows.nnz(0, r + 1) > 4 * cl)
        .unwrap();
    rows.read(0, ok).unwrap();
}

/// The raw-chunk call is chosen by the HDF5 this is built against (`H5Dread_chunk2` from
/// HDF5 2.0 on): the library that is running must be of that family.
#[test]
fn the_chunk_read_call_matches_the_linked_hdf5() {
    let (major, minor, patch) = hdf5::library_version();
    assert_eq!(
        super::HDF5_2,
        major >= 2,
        "HDF5 {major}.{minor}.{patch} is running, but this build calls {}",
        if super::HDF5_2 {
            "H5Dread_chunk2"
        } else {
            "H5Dread_chunk"
        }
    );
}
