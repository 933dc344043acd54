//! Read speed of [`H5adRows`] against h5py and anndata's backed mode, on a synthetic
//! 100k cells × 20k genes CSR `.h5ad` with ~2k values per cell, gzip-compressed as
//! `anndata.write_h5ad(compression="gzip")` writes it.
//!
//! `cargo bench -p scfm-common --bench reader` writes the file once (with the Python of
//! `SCFM_PYTHON`, else `.venv/bin/python`) under `.cache/bench/` and reuses it, then
//! measures, in interleaved rounds (the order of the readers rotated every round and
//! reversed every other round): sequential 1,000-row blocks over the whole matrix, and
//! random single rows (fixed seed), for
//!
//! - scfm with raw-chunk decoding on 2 threads (the default: the caller's and a helper),
//! - scfm with raw-chunk decoding on 1 thread (`H5adRows::set_decode_threads(1)`, as the
//!   training loader reads), the equal-cores comparison with one h5py process,
//! - scfm through libhdf5 only (`SCFM_H5AD_RAW_CHUNKS=0`, the old path),
//! - h5py slicing `X/indices` and `X/data`, one process,
//! - h5py as 2 processes, each reading half of the blocks (or of the random rows) at the
//!   same time (both open the file and wait at a barrier, untimed): the equal-cores
//!   comparison with scfm's 2 decoding threads; wall time from the first start to the last
//!   end, CPU time summed,
//! - anndata backed (`X[a:b]`, `X[i]`, `X` taken once).
//!
//! It prints each round, the medians with their min–max, and the ratios within each
//! round (median and min–max). Besides cells per second of wall time, it reports cells
//! per CPU-second (all threads, all processes of a side), which a busy machine disturbs
//! less and which does not depend on how many cores a side uses.
//!
//! `SCFM_BENCH_ROUNDS` (default 3) and `SCFM_BENCH_RANDOM` (random rows per round,
//! default 2000) change the work; `SCFM_BENCH_SOURCE_CELLS` (default 100,000) makes a
//! smaller file for development (cached under its own name); `SCFM_BENCH_PYTHON=0`
//! measures scfm only.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
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

/// Times one reading pattern with h5py or anndata over part `part` of `parts` of the
/// work (contiguous: whole 1,000-row blocks, or a slice of the random rows). Opens the
/// file, prints `ready`, waits for a line on stdin (the barrier of the processes of one
/// measurement), then prints `cells start end cpu` (CLOCK_MONOTONIC, shared by all
/// processes; CPU seconds of this process).
const MEASURE: &str = r#"
import sys, time
import numpy as np
path, lib, kind, block, rows_file = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
part, parts = int(sys.argv[6]), int(sys.argv[7])
rows = np.loadtxt(rows_file, dtype=np.int64, ndmin=1)
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
n_blocks = (n + block - 1) // block
my_blocks = range(n_blocks * part // parts, n_blocks * (part + 1) // parts)
my_rows = rows[len(rows) * part // parts : len(rows) * (part + 1) // parts].tolist()
print("ready", flush=True)
sys.stdin.readline()
now = lambda: time.clock_gettime(time.CLOCK_MONOTONIC)
t, c = now(), time.process_time()
if kind == "seq":
    cells = 0
    for k in my_blocks:
        a, b = k * block, min(n, (k + 1) * block)
        block_read(a, b)
        cells += b - a
else:
    for i in my_rows:
        row_read(i)
    cells = len(my_rows)
print(cells, t, now(), time.process_time() - c, flush=True)
"#;

/// `SCFM_PYTHON`, else the repository's `.venv/bin/python`.
fn python() -> String {
    std::env::var("SCFM_PYTHON").unwrap_or_else(|_| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
        p.to_string_lossy().into_owned()
    })
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

/// The benchmark file of `cells` cells, written by Python unless it already exists.
fn bench_file(dir: &Path, cells: usize) -> PathBuf {
    let path = dir.join(format!("synthetic_{cells}x{GENES}_{PER_CELL}nnz_gzip.h5ad"));
    if path.exists() {
        return path;
    }
    std::fs::create_dir_all(dir).unwrap();
    let tmp = path.with_extension("tmp.h5ad");
    eprintln!("writing {} with anndata (a few minutes)…", path.display());
    let t = Instant::now();
    let args = [cells, GENES, PER_CELL].map(|n| n.to_string());
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

/// Rates of one Python pattern (`seq` or `random`) run as `parts` processes at once,
/// each doing its part; NaN if it failed. Wall time: from the first process's start to
/// the last one's end (after all have opened the file); CPU time: summed.
fn py(path: &Path, lib: &str, kind: &str, rows_file: &Path, parts: usize) -> Rate {
    match py_parts(path, lib, kind, rows_file, parts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{lib} {kind} ({parts} processes): {e}");
            Rate::new(f64::NAN, 1.0, 1.0)
        }
    }
}

fn py_parts(
    path: &Path,
    lib: &str,
    kind: &str,
    rows_file: &Path,
    parts: usize,
) -> Result<Rate, String> {
    let (block, n) = (BLOCK.to_string(), parts.to_string());
    let mut children: Vec<Child> = Vec::new();
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let kill_all = |children: &mut Vec<Child>| {
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    for part in 0..parts {
        let p = part.to_string();
        let args = [
            path.to_str().unwrap(),
            lib,
            kind,
            &block,
            rows_file.to_str().unwrap(),
            &p,
            &n,
        ];
        let mut child = match Command::new(python())
            .arg("-c")
            .arg(MEASURE)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                kill_all(&mut children);
                return Err(format!("cannot run {}: {e}", python()));
            }
        };
        let out = BufReader::new(child.stdout.take().unwrap());
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send((part, line)).is_err() {
                    break;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let start = Instant::now();
    let next = |what: &str, children: &mut Vec<Child>| -> Result<(usize, String), String> {
        let left = PY_TIMEOUT.saturating_sub(start.elapsed());
        rx.recv_timeout(left).map_err(|e| {
            kill_all(children);
            format!("no {what} line ({e}; its error is above)")
        })
    };
    for _ in 0..parts {
        let (_, line) = next("ready", &mut children)?;
        if line.trim() != "ready" {
            kill_all(&mut children);
            return Err(format!("printed {line:?}"));
        }
    }
    // The barrier: every process has opened the file; all start now.
    for c in &mut children {
        let _ = writeln!(c.stdin.as_mut().unwrap(), "go");
    }
    let (mut cells, mut first, mut last, mut cpu) = (0.0, f64::INFINITY, 0.0f64, 0.0);
    for _ in 0..parts {
        let (_, line) = next("result", &mut children)?;
        let v: Vec<f64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        let [c, t0, t1, p] = v[..] else {
            kill_all(&mut children);
            return Err(format!("printed {line:?}"));
        };
        (cells, first, last, cpu) = (cells + c, first.min(t0), last.max(t1), cpu + p);
    }
    for c in &mut children {
        let _ = c.wait();
    }
    Ok(Rate::new(cells, last - first, cpu))
}

/// The median (the mean of the middle two of an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The order of `n` sides in round `r`: rotated by `r / 2`, reversed every other round
/// (as `scfm_worker::bench_protocol::round_order`).
fn round_order(n: usize, r: usize) -> Vec<usize> {
    let mut o: Vec<usize> = (0..n).map(|i| (i + r / 2) % n).collect();
    if r % 2 == 1 {
        o.reverse();
    }
    o
}

/// `median (min–max)` of `v`, with `digits` decimals.
fn summary(v: &[f64], digits: usize) -> String {
    if v.is_empty() || v.iter().any(|x| x.is_nan()) {
        return "—".into();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.digits$} ({lo:.digits$}–{hi:.digits$})", median(v))
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
    let path = bench_file(&dir, env_usize("SCFM_BENCH_SOURCE_CELLS", CELLS).max(BLOCK));
    let (rounds, n_random) = (
        env_usize("SCFM_BENCH_ROUNDS", 3).max(1),
        env_usize("SCFM_BENCH_RANDOM", 2000),
    );
    if std::env::var_os("SCFM_H5AD_RAW_CHUNKS").is_some() {
        eprintln!("note: SCFM_H5AD_RAW_CHUNKS is set; the first scfm rows read with it");
    }
    let two = H5adRows::open(&path, &MatrixSource::X).unwrap().unwrap();
    let mut one = H5adRows::open(&path, &MatrixSource::X).unwrap().unwrap();
    one.set_decode_threads(1);
    // SAFETY: single-threaded here (no reads are running, so no decoding threads exist).
    unsafe { std::env::set_var("SCFM_H5AD_RAW_CHUNKS", "0") };
    let old = H5adRows::open(&path, &MatrixSource::X).unwrap().unwrap();
    // SAFETY: as above.
    unsafe { std::env::remove_var("SCFM_H5AD_RAW_CHUNKS") };
    let random = random_rows(two.n_rows(), n_random);
    let rows_file = dir.join("random_rows.txt");
    let text: Vec<String> = random.iter().map(usize::to_string).collect();
    std::fs::write(&rows_file, text.join("\n")).unwrap();
    println!(
        "file: {} ({} × {}, {:.1}M values, gzip); {rounds} rounds, {n_random} random rows each; {} logical CPUs",
        path.display(),
        two.n_rows(),
        two.n_cols(),
        two.nnz(0, two.n_rows()) as f64 / 1e6,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("load average at start: {}", load_average());
    // (name, cores it reads on)
    let names = [
        ("scfm (raw chunks, 2 decoding threads)", 2),
        ("scfm (raw chunks, 1 decoding thread)", 1),
        ("scfm (libhdf5, old path)", 1),
        ("h5py", 1),
        ("h5py, 2 processes", 2),
        ("anndata backed", 1),
    ];
    let python = !std::env::var("SCFM_BENCH_PYTHON").is_ok_and(|v| v == "0");
    let sides: Vec<usize> = (0..names.len()).filter(|&i| python || i < 3).collect();
    // results[method] = (sequential, random) of each round.
    let mut results: Vec<Vec<(Rate, Rate)>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        for k in round_order(sides.len(), round) {
            let i = sides[k];
            let (s, r) = match i {
                0 => scfm(&two, &random),
                1 => scfm(&one, &random),
                2 => scfm(&old, &random),
                _ => {
                    let (lib, parts) = [("h5py", 1), ("h5py", 2), ("anndata", 1)][i - 3];
                    (
                        py(&path, lib, "seq", &rows_file, parts),
                        py(&path, lib, "random", &rows_file, parts),
                    )
                }
            };
            println!(
                "round {round}: {:<38} seq {:>7.0} cells/s ({:>7.0}/CPU-s)  random {:>6.0} rows/s ({:>6.0}/CPU-s)",
                names[i].0, s.wall, s.cpu, r.wall, r.cpu
            );
            results[i].push((s, r));
        }
    }
    let pick = |x: &(Rate, Rate), k: usize| [x.0.wall, x.0.cpu, x.1.wall, x.1.cpu][k];
    println!(
        "\nmedian (min–max) of {rounds} rounds (1,000-row blocks over all cells | {n_random} single random rows):\n"
    );
    println!("| reader | cores | sequential cells/s | per CPU-s | random rows/s | per CPU-s |");
    println!("|---|---|---|---|---|---|");
    for &i in &sides {
        let cols: Vec<String> = (0..4)
            .map(|k| {
                let v: Vec<f64> = results[i].iter().map(|x| pick(x, k)).collect();
                summary(&v, 0)
            })
            .collect();
        println!("| {} | {} | {} |", names[i].0, names[i].1, cols.join(" | "));
    }
    // Ratios within each round (same machine load), then their median and min–max.
    println!("\nratios, median (min–max) of the rounds' ratios:\n");
    println!("| ratio | cores | sequential | per CPU-s | random | per CPU-s |");
    println!("|---|---|---|---|---|---|");
    for (label, a, b, cores) in [
        ("scfm 2 threads / scfm old path", 0, 2, "2 vs 1"),
        ("scfm 2 threads / h5py", 0, 3, "2 vs 1"),
        ("**scfm 2 threads / h5py 2 processes**", 0, 4, "**2 vs 2**"),
        ("**scfm 1 thread / h5py**", 1, 3, "**1 vs 1**"),
        ("scfm 2 threads / anndata backed", 0, 5, "2 vs 1"),
        ("scfm 1 thread / anndata backed", 1, 5, "1 vs 1"),
    ] {
        if !(sides.contains(&a) && sides.contains(&b)) {
            continue;
        }
        let cols: Vec<String> = (0..4)
            .map(|k| {
                let ratios: Vec<f64> = (results[a].iter().zip(&results[b]))
                    .map(|(x, y)| pick(x, k) / pick(y, k))
                    .collect();
                summary(&ratios, 2) + "×"
            })
            .collect();
        println!("| {label} | {cores} | {} |", cols.join(" | "));
    }
    println!("\nload average at end: {}", load_average());
}

/// The first three fields of `/proc/loadavg` (how busy the machine was).
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
