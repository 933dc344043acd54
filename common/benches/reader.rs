//! Read speed of [`H5adRows`] against h5py and anndata's backed mode, on a synthetic
//! 100k cells × 20k genes CSR `.h5ad` with ~2k values per cell, gzip-compressed as
//! `anndata.write_h5ad(compression="gzip")` writes it.
//!
//! `cargo bench -p scfm-common --bench reader` writes the file once (with the Python of
//! `SCFM_PYTHON`) under `.cache/bench/` and reuses it, then measures, in interleaved rounds:
//! sequential 1,000-row blocks over the whole matrix, and random single rows (fixed seed),
//! for scfm with raw-chunk decoding, scfm through libhdf5 only (`SCFM_H5AD_RAW_CHUNKS=0`,
//! the old path), h5py slicing `X/indices` and `X/data`, and anndata backed (`X[a:b]`,
//! `X[i]`). It prints each round and the median. `SCFM_BENCH_ROUNDS` (default 3) and
//! `SCFM_BENCH_RANDOM` (random rows per round, default 2000) change the work;
//! `SCFM_BENCH_PYTHON=0` measures scfm only. Besides cells per second of wall time, it
//! reports cells per CPU-second (all threads), which a busy machine disturbs less.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scfm_common::data::h5ad::MatrixSource;
use scfm_common::data::h5ad::rows::H5adRows;

const CELLS: usize = 100_000;
const GENES: usize = 20_000;
const PER_CELL: usize = 2_000;
const BLOCK: usize = 1_000;
/// Longest a Python measurement (or writing the file) may take.
const PY_TIMEOUT: Duration = Duration::from_secs(900);

/// Writes the synthetic file: Bernoulli(2k/20k) sparsity, counts 1 + geometric(0.4).
const MAKE: &str = r#"
import sys
import numpy as np, pandas as pd, scipy.sparse as sp, anndata as ad
out, n, g, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
blocks = []
for a in range(0, n, 1000):
    m = sp.csr_matrix(rng.random((min(n, a + 1000) - a, g), dtype=np.float32) < k / g, dtype=np.float32)
    m.data = (1 + rng.geometric(0.4, m.nnz)).astype(np.float32)
    blocks.append(m)
X = sp.vstack(blocks, format="csr")
del blocks
a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"cell{i}" for i in range(n)]),
               var=pd.DataFrame(index=[f"gene{j}" for j in range(g)]))
a.write_h5ad(out, compression="gzip")
"#;

/// Times one reading pattern with h5py or anndata; prints `cells seconds`.
const MEASURE: &str = r#"
import sys, time
import numpy as np
path, lib, kind, block, rows_file = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
rows = np.loadtxt(rows_file, dtype=np.int64)
if lib == "h5py":
    import h5py
    f = h5py.File(path, "r")
    indptr = f["X/indptr"][:]
    ind, dat = f["X/indices"], f["X/data"]
    n = len(indptr) - 1
    def block_read(a, b):
        lo, hi = indptr[a], indptr[b]
        return ind[lo:hi], dat[lo:hi]
    row_read = lambda i: block_read(i, i + 1)
else:
    import anndata as ad
    X = ad.read_h5ad(path, backed="r").X
    n = X.shape[0]
    block_read = lambda a, b: X[a:b]
    row_read = lambda i: X[i]
t, c = time.perf_counter(), time.process_time()
if kind == "seq":
    for a in range(0, n, block):
        block_read(a, min(n, a + block))
    cells = n
else:
    for i in rows:
        row_read(int(i))
    cells = len(rows)
print(cells, time.perf_counter() - t, time.process_time() - c)
"#;

fn python() -> String {
    std::env::var("SCFM_PYTHON").expect("SCFM_PYTHON names the Python with anndata and h5py")
}

/// Runs `python -c script args…` with a time limit; returns its stdout.
fn run_python(script: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", python()))?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if start.elapsed() > PY_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("timed out after {PY_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    if status.success() {
        Ok(out)
    } else {
        Err(format!("{status}: {err}"))
    }
}

/// The benchmark file, written by Python unless it already exists.
fn bench_file(dir: &Path) -> PathBuf {
    let path = dir.join(format!("synthetic_{CELLS}x{GENES}_{PER_CELL}nnz_gzip.h5ad"));
    if path.exists() {
        return path;
    }
    std::fs::create_dir_all(dir).unwrap();
    let tmp = path.with_extension("tmp.h5ad");
    eprintln!("writing {} with anndata (a few minutes)…", path.display());
    let t = Instant::now();
    let args = [CELLS, GENES, PER_CELL].map(|n| n.to_string());
    let mut all = vec![tmp.to_str().unwrap()];
    all.extend(args.iter().map(String::as_str));
    run_python(MAKE, &all).unwrap_or_else(|e| panic!("writing the bench file failed: {e}"));
    std::fs::rename(&tmp, &path).unwrap();
    eprintln!("written in {:.0?}", t.elapsed());
    path
}

/// `count` distinct-enough random rows below `n` (xorshift, fixed seed).
fn random_rows(n: usize, count: usize) -> Vec<usize> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % n as u64) as usize
        })
        .collect()
}

/// CPU seconds used by this process so far (all threads; Linux, 10 ms resolution).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0.0))
        .collect();
    // utime and stime, fields 14 and 15 of proc(5), in clock ticks (100 per second).
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// Rates of one pattern: cells per wall-clock second and per CPU-second.
#[derive(Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: f64,
}

impl Rate {
    fn new(cells: f64, wall: f64, cpu: f64) -> Rate {
        Rate {
            wall: cells / wall,
            cpu: cells / cpu,
        }
    }
}

/// Times `f` reading `cells` cells.
fn timed(cells: usize, f: impl FnOnce()) -> Rate {
    let (t, c) = (Instant::now(), cpu_secs());
    f();
    Rate::new(cells as f64, t.elapsed().as_secs_f64(), cpu_secs() - c)
}

/// Sequential blocks, then random rows, through `rows`.
fn scfm(rows: &H5adRows, random: &[usize]) -> (Rate, Rate) {
    let n = rows.n_rows();
    let mut nnz = 0;
    let seq = timed(n, || {
        for a in (0..n).step_by(BLOCK) {
            nnz += rows.read(a, (a + BLOCK).min(n)).unwrap().data.len();
        }
    });
    let rand = timed(random.len(), || {
        for &r in random {
            nnz += rows.read(r, r + 1).unwrap().data.len();
        }
    });
    std::hint::black_box(nnz);
    (seq, rand)
}

/// Rates of one Python pattern (`seq` or `random`), NaN if it failed.
fn py(path: &Path, lib: &str, kind: &str, rows_file: &Path) -> Rate {
    let block = BLOCK.to_string();
    let args = [
        path.to_str().unwrap(),
        lib,
        kind,
        &block,
        rows_file.to_str().unwrap(),
    ];
    match run_python(MEASURE, &args) {
        Ok(out) => {
            let v: Vec<f64> = out
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            Rate::new(v[0], v[1], v[2])
        }
        Err(e) => {
            eprintln!("{lib} {kind}: {e}");
            Rate::new(f64::NAN, 1.0, 1.0)
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    scfm_common::alloc::tune(); // as the scfm binaries do
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: skip the long run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("reader: a benchmark; run it with `cargo bench -p scfm-common --bench reader`");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join(".cache/bench");
    let path = bench_file(&dir);
    let (rounds, n_random) = (
        env_usize("SCFM_BENCH_ROUNDS", 3),
        env_usize("SCFM_BENCH_RANDOM", 2000),
    );
    if std::env::var_os("SCFM_H5AD_RAW_CHUNKS").is_some() {
        eprintln!("note: SCFM_H5AD_RAW_CHUNKS is set; the first scfm row reads with it");
    }
    let new = H5adRows::open(&path, &MatrixSource::X).unwrap().unwrap();
    // SAFETY: single-threaded here (no reads are running, so no decoding threads exist).
    unsafe { std::env::set_var("SCFM_H5AD_RAW_CHUNKS", "0") };
    let old = H5adRows::open(&path, &MatrixSource::X).unwrap().unwrap();
    // SAFETY: as above.
    unsafe { std::env::remove_var("SCFM_H5AD_RAW_CHUNKS") };
    let random = random_rows(new.n_rows(), n_random);
    let rows_file = dir.join("random_rows.txt");
    let text: Vec<String> = random.iter().map(usize::to_string).collect();
    std::fs::write(&rows_file, text.join("\n")).unwrap();
    println!(
        "file: {} ({} × {}, {:.1}M values, gzip); {rounds} rounds, {n_random} random rows each",
        path.display(),
        new.n_rows(),
        new.n_cols(),
        new.nnz(0, new.n_rows()) as f64 / 1e6
    );
    println!("load average at start: {}", load_average());
    let names = [
        "scfm (raw chunks)",
        "scfm (libhdf5, old path)",
        "h5py",
        "anndata backed",
    ];
    // results[method] = (sequential, random) of each round.
    let mut results: Vec<Vec<(Rate, Rate)>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        let mut row = |i: usize, (s, r): (Rate, Rate)| {
            println!(
                "round {round}: {:<26} seq {:>7.0} cells/s ({:>7.0}/CPU-s)  random {:>6.0} rows/s ({:>6.0}/CPU-s)",
                names[i], s.wall, s.cpu, r.wall, r.cpu
            );
            results[i].push((s, r));
        };
        // Alternate the order of the two scfm paths between rounds.
        let scfm_order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in scfm_order {
            row(i, scfm(if i == 0 { &new } else { &old }, &random));
        }
        let py_libs = if std::env::var("SCFM_BENCH_PYTHON").is_ok_and(|v| v == "0") {
            &[][..]
        } else {
            &[(2, "h5py"), (3, "anndata")][..]
        };
        for &(i, lib) in py_libs {
            let s = py(&path, lib, "seq", &rows_file);
            let r = py(&path, lib, "random", &rows_file);
            row(i, (s, r));
        }
    }
    // Medians: [seq wall, seq cpu, random wall, random cpu] per method.
    let med: Vec<[f64; 4]> = results
        .iter()
        .map(|rs| {
            let m = |f: fn(&(Rate, Rate)) -> f64| match rs.len() {
                0 => f64::NAN,
                _ => median(&rs.iter().map(f).collect::<Vec<_>>()),
            };
            [
                m(|x| x.0.wall),
                m(|x| x.0.cpu),
                m(|x| x.1.wall),
                m(|x| x.1.cpu),
            ]
        })
        .collect();
    println!(
        "\nmedian of {rounds} rounds (1,000-row blocks over all cells | {n_random} single random rows):"
    );
    let head = ["cells/s", "cells/CPU-s", "rows/s", "rows/CPU-s"];
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>12}",
        "reader", head[0], head[1], head[2], head[3]
    );
    for (name, m) in names.iter().zip(&med) {
        println!(
            "{name:<28} {:>12.0} {:>12.0} {:>12.0} {:>12.0}",
            m[0], m[1], m[2], m[3]
        );
    }
    // Ratios within each round (same machine load), then their median.
    println!("ratios, median of the rounds' ratios:");
    for (label, i) in [
        ("scfm / scfm old path", 1),
        ("scfm / h5py", 2),
        ("scfm / anndata backed", 3),
    ] {
        let r: Vec<String> = (0..4)
            .map(|k| {
                let pick = |x: &(Rate, Rate)| [x.0.wall, x.0.cpu, x.1.wall, x.1.cpu][k];
                let ratios: Vec<f64> = (results[0].iter().zip(&results[i]))
                    .map(|(a, b)| pick(a) / pick(b))
                    .collect();
                let m = if ratios.is_empty() {
                    f64::NAN
                } else {
                    median(&ratios)
                };
                format!("{m:>11.2}×")
            })
            .collect();
        println!("{label:<28} {}", r.join(" "));
    }
    println!("load average at end: {}", load_average());
}

/// The first three fields of `/proc/loadavg` (how busy the machine was).
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
