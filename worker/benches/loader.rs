//! `cargo bench -p scfm-worker --bench loader`: how fast the training loader delivers
//! shuffled, tokenised two-view batches, side by side with Python baselines over the same
//! shards in the same order, and whether it keeps the `default` model fed on a GPU.
//!
//! 1. Makes (once, cached under `.cache/bench/loader/`) a synthetic source of integer
//!    counts, 100k cells × 20k genes (~2k expressed genes per cell, skewed detection and
//!    geometric counts), written by Python anndata with `compression="gzip"`, and
//!    prepares it with `scfm_common::data::prepared::prepare` into 5 shards with codec
//!    `lzf` after HDF5's byte shuffle (the default), plain `lzf`, and `none`.
//! 2. Codecs: runs the real [`Loader`] (one thread, `tch::set_num_threads(1)`, the
//!    `default` preset's tokenizer and the default augmentations, batch 64, block/window
//!    64/64) on each set, and on the default set with `SCFM_H5AD_RAW_CHUNKS=0` (libhdf5
//!    decodes), in interleaved rounds: cells/s of wall time, per CPU-second of the loader
//!    thread and of the whole process.
//! 3. Side by side (`side_by_side.rs`), on the default shards, the same cells in the same
//!    order: scfm's read stage, read + normalise stage and whole loader against
//!    `benches/py_loader.py` (h5py reads, h5py + numpy normalisation, anndata backed
//!    `X[a:a+64]` blocks, a numpy loader doing the loader's work, anndata backed `X[i]`
//!    per cell with `X` hoisted), warm in one Python process; per wall second and per
//!    CPU-second of each process, rounds interleaved in rotated/alternated order, medians
//!    with min–max, ratios scfm / each baseline.
//! 4. Times each stage of the loader's work single-threaded (`stages.rs`: block read +
//!    decompression, normalise, block lookup, thinning, tokenise, collate with the GEPC
//!    profiles) on the same cells.
//! 5. Data wait at GPU step rates (`gpu_wait.rs`): a consumer sleeping for what a
//!    `default` step of the bench's batch takes at an assumed sustained bf16 rate, fed by
//!    the loader with `data.loader_threads` 1, 2, 3, 4.
//! 6. Trains the `default` preset for a few steps on CPU fed by the loader and prints the
//!    data-wait fraction (and the first step's wait, which includes opening and
//!    checksumming the shards).
//!
//! The load average (`/proc/loadavg`) is printed at the start and at the end.
//!
//! Environment: `SCFM_BENCH_SOURCE_CELLS` (cells of the synthetic source, default 100,000;
//! a smaller source gets its own cached files, `source / 5` cells per shard — for
//! development), `SCFM_BENCH_CELLS` (timed cells per run, default 25,600),
//! `SCFM_BENCH_ROUNDS` (5), `SCFM_BENCH_ANNDATA_CELLS` (timed cells of the per-cell
//! anndata side, 2,000), `SCFM_BENCH_MAX_SPREAD` (0.25: no ratio where a side's rounds
//! spread more), `SCFM_BENCH_GPU_THREADS` (`1,2,3,4`), `SCFM_BENCH_GPU_PEAK_TFLOPS` (989,
//! the H200's dense bf16 peak), `SCFM_BENCH_GPU_MFU` (0.4), `SCFM_BENCH_TRAIN_STEPS` (20;
//! 0 skips the CPU training), `SCFM_BENCH_TRAIN_BATCH` (8), `SCFM_BENCH_TRAIN_THREADS`
//! (1), `SCFM_PYTHON` (`.venv/bin/python`), `SCFM_BENCH_PYTHON=0` (no Python side);
//! `SCFM_BENCH_ONLY=PREFIX` measures only the shard sets whose name starts with it (parts
//! 3 and 5 need the default set). Each part prints how long it took.

#[path = "loader/gpu_wait.rs"]
mod gpu_wait;
#[path = "loader/side_by_side.rs"]
mod side_by_side;
#[path = "loader/stages.rs"]
mod stages;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use scfm_common::config::{DataConfig, ModelConfig, TrainSpec};
use scfm_common::data::h5ad::MatrixSource;
use scfm_common::data::h5ad::rows::H5adRows;
use scfm_common::data::h5ad::write::Codec;
use scfm_common::data::prepared::{PrepareSettings, PreparedDataset, prepare};
use scfm_worker::bench_protocol::{Rates, load_average, ratio, round_order};
use scfm_worker::data::{
    CellSource, Keyed, Loader, LoaderConfig, OrderConfig, SampleOrder, open_source,
};
use scfm_worker::trainer::{RunOptions, Trainer};

/// Cells of the full synthetic source (`SCFM_BENCH_SOURCE_CELLS` makes a smaller one).
const CELLS: usize = 100_000;
const GENES: usize = 20_000;
const NNZ_PER_CELL: usize = 2_000;
const BATCH: usize = 64;
const BLOCK: usize = 64;
const WINDOW: usize = 64;

/// Writes the synthetic source with anndata (args: cells, genes, nnz per cell, out).
/// Genes have log-normal detection weights scaled so a cell expresses ~`nnz` of them
/// (times a per-cell size factor); an expressed gene's count is geometric (negative
/// binomial with r = 1, shifted to >= 1) with a gene- and cell-dependent mean.
const GEN_PY: &str = r#"
import sys, time, json
import numpy as np, scipy.sparse as sp, pandas as pd, anndata as ad
n_cells, n_genes, nnz, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(20261127)
w = rng.lognormal(0.0, 1.5, n_genes)
lo, hi = 0.0, 1.0
while np.minimum(1.0, hi * w).sum() < nnz:
    hi *= 2
for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if np.minimum(1.0, mid * w).sum() < nnz else (lo, mid)
p = (hi * w).astype(np.float32)
extra = 1.5 * (w / w.mean()) ** 0.7
size = rng.lognormal(0.0, 0.3, n_cells)
size /= size.mean()
indptr = np.zeros(n_cells + 1, np.int64)
ind, dat = [], []
for a in range(0, n_cells, 2000):
    b = min(a + 2000, n_cells)
    mask = rng.random((b - a, n_genes), dtype=np.float32) < size[a:b, None].astype(np.float32) * p
    r, c = np.nonzero(mask)
    indptr[a + 1:b + 1] = indptr[a] + np.cumsum(mask.sum(1))
    ind.append(c.astype(np.int32))
    dat.append(rng.geometric(1.0 / (1.0 + extra[c] * size[a + r])).astype(np.float32))
x = sp.csr_matrix((np.concatenate(dat), np.concatenate(ind), indptr), shape=(n_cells, n_genes))
a = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"cell-{i:07d}" for i in range(n_cells)]),
               var=pd.DataFrame(index=[f"G{j:05d}" for j in range(n_genes)]))
a.write_h5ad(out, compression="gzip")
print(json.dumps({"nnz": int(x.nnz), "mean_counts": float(x.sum() / n_cells)}))
"#;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    p.canonicalize().unwrap_or(p)
}

fn python() -> PathBuf {
    std::env::var_os("SCFM_PYTHON").map_or_else(|| repo().join(".venv/bin/python"), PathBuf::from)
}

fn run_python(script: &str, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", python().display()))?;
    if !out.status.success() {
        bail!("python failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("python printed {text:?}"))
}

/// The gzip source of `cells` cells, generated when absent.
fn source(dir: &Path, cells: usize) -> Result<PathBuf> {
    let path = if cells == CELLS {
        dir.join("source-100k-gzip.h5ad")
    } else {
        dir.join(format!("source-{cells}-gzip.h5ad"))
    };
    if !path.is_file() {
        eprintln!("generating {} with anndata (once)...", path.display());
        let tmp = dir.join("source.tmp.h5ad");
        let t = Instant::now();
        let a = [cells, GENES, NNZ_PER_CELL].map(|n| n.to_string());
        let r = run_python(GEN_PY, &[&a[0], &a[1], &a[2], tmp.to_str().unwrap()])?;
        std::fs::rename(&tmp, &path)?;
        eprintln!("  {r} in {:.0} s", t.elapsed().as_secs_f64());
    }
    Ok(path)
}

/// The prepared dataset of `src` (`cells` cells) with `codec`, prepared when absent, in 5
/// shards (20,000 cells each for the full source); prints its shards.
fn prepared(
    dir: &Path,
    src: &Path,
    cells: usize,
    codec: Codec,
    shuffle: bool,
    name: &str,
) -> Result<PathBuf> {
    let out = if cells == CELLS {
        dir.join(format!("prepared-{name}"))
    } else {
        dir.join(format!("prepared-{name}-{cells}"))
    };
    if !PreparedDataset::is_prepared_dir(&out) {
        let s = PrepareSettings {
            codec,
            shuffle,
            shard_cells: cells.div_ceil(5).max(1),
            ..PrepareSettings::default()
        };
        let t = Instant::now();
        prepare(&[src.to_path_buf()], out.to_str().unwrap(), &s, &mut |_| {})?;
        eprintln!("prepared {name} in {:.1} s", t.elapsed().as_secs_f64());
    }
    let text = std::fs::read(out.join("dataset.json"))?;
    let m: serde_json::Value = serde_json::from_slice(&text)?;
    let shards = m["shards"].as_array().cloned().unwrap_or_default();
    let bytes: Vec<u64> = shards.iter().filter_map(|s| s["bytes"].as_u64()).collect();
    println!(
        "  prepared-{name}: {} shards of {} cells, {} MB in all ({} MB each), mean {:.0} genes/cell",
        shards.len(),
        m["preprocessing"]["shard_cells"],
        bytes.iter().sum::<u64>() >> 20,
        bytes
            .iter()
            .map(|b| (b >> 20).to_string())
            .collect::<Vec<_>>()
            .join("/"),
        m["stats"]["mean_genes_per_cell"].as_f64().unwrap_or(0.0)
    );
    Ok(out)
}

fn data_config(path: &Path) -> Result<DataConfig> {
    Ok(serde_norway::from_str(&format!(
        "path: {}",
        path.display()
    ))?)
}

fn order_of(shard_cells: &[usize]) -> SampleOrder {
    SampleOrder::new(
        shard_cells,
        OrderConfig {
            seed: 0,
            validation_fraction: 0.05,
            block_cells: BLOCK,
            window_units: WINDOW,
        },
    )
}

fn loader_config() -> LoaderConfig {
    LoaderConfig {
        seed: 0,
        batch_size: BATCH,
        grad_accum: 1,
        augment: scfm_common::config::Augment::default(),
        prefetch: 4,
        block_cells: BLOCK,
        window_units: WINDOW,
        threads: 1,
        rank: 0,
        world: 1,
    }
}

/// CPU seconds of this process, all threads, living and ended (`/proc/self/stat`).
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU seconds of this process's thread named `name` (`schedstat`, nanoseconds).
fn thread_cpu_s(name: &str) -> Option<f64> {
    for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let s = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
            return Some(s.split_whitespace().next()?.parse::<u64>().ok()? as f64 * 1e-9);
        }
    }
    None
}

/// CPU seconds used between two samples (`None` when either is missing).
fn delta(a: Option<f64>, b: Option<f64>) -> f64 {
    a.zip(b).map_or(f64::NAN, |(a, b)| b - a)
}

/// One timed loader run (`threads` tokenising threads) of `cells` cells from `position`,
/// after an untimed start-up batch: wall seconds, CPU seconds of the loader thread, CPU
/// seconds of the whole process (the loader and any helper threads; the main thread only
/// waits). With `expect` (the run's cells, start-up batch first), checks that the loader
/// delivers exactly those cells in that order.
fn loader_run(
    src: &Arc<dyn CellSource>,
    model: &ModelConfig,
    position: usize,
    cells: usize,
    expect: Option<&[Keyed]>,
) -> Result<[f64; 3]> {
    let order = order_of(&src.shard_cells());
    let l = Loader::start(src.clone(), order, model, loader_config(), 0, position);
    let check = |i: usize, d: &scfm_worker::data::StepData| {
        assert_eq!(d.micro[0].n, 2 * BATCH);
        if let Some(e) = expect {
            assert_eq!(d.cells[0][..], e[i * BATCH..(i + 1) * BATCH], "batch {i}");
        }
    };
    check(0, &l.next()?); // start-up (first blocks) not timed
    let (t, c0, p0) = (Instant::now(), thread_cpu_s("scfm-loader"), process_cpu_s());
    for i in 1..=cells / BATCH {
        check(i, &l.next()?);
    }
    let wall = t.elapsed().as_secs_f64();
    let (c1, p1) = (thread_cpu_s("scfm-loader"), process_cpu_s());
    Ok([wall, delta(c0, c1), delta(p0, p1)])
}

/// The shards of the prepared dataset at `dir` opened as the loader's source opens them
/// (one decoding thread: the reading thread), with their row counts and genes.
fn open_rows(dir: &Path, hdf5_decoding: bool) -> Result<(Vec<H5adRows>, Vec<usize>, usize)> {
    let ds = tokio::runtime::Builder::new_current_thread()
        .build()?
        .block_on(PreparedDataset::open(dir.to_str().unwrap()))?;
    let rows = with_hdf5_decoding(hdf5_decoding, || {
        ds.manifest
            .shards
            .iter()
            .map(|s| {
                let mut r =
                    H5adRows::open(&dir.join(&s.path), &MatrixSource::X)?.context("not CSR")?;
                r.set_decode_threads(1); // as the loader's source does
                Ok(r)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let cells = ds.manifest.shards.iter().map(|s| s.n_cells).collect();
    Ok((rows, cells, ds.manifest.n_genes))
}

/// Runs `f` with the raw-chunk reading path of `H5adRows` off when `hdf5_decoding`
/// (`SCFM_H5AD_RAW_CHUNKS=0`, read when a shard is opened): compressed chunks are then
/// decoded by libhdf5 on the calling thread.
fn with_hdf5_decoding<T>(hdf5_decoding: bool, f: impl FnOnce() -> T) -> T {
    const VAR: &str = "SCFM_H5AD_RAW_CHUNKS";
    if hdf5_decoding {
        // SAFETY: called from the main thread while no other thread of this process reads
        // the environment (no loader, prefetch or training thread is running).
        unsafe { std::env::set_var(VAR, "0") };
    }
    let out = f();
    if hdf5_decoding {
        // SAFETY: as above.
        unsafe { std::env::remove_var(VAR) };
    }
    out
}

/// Trains the `default` preset for `steps` steps on CPU from `dir`; prints the summary.
fn train(dir: &Path, work: &Path, steps: usize, batch: usize, threads: usize) -> Result<f64> {
    let yaml = work.join("train.yaml");
    std::fs::write(
        &yaml,
        format!(
            "data: {{path: {}, block_cells: {BLOCK}, shuffle_window: {WINDOW}}}\n\
             model: {{preset: default}}\n\
             training: {{batch_size: {batch}, max_steps: {steps}, warmup_steps: 5, \
             eval_every: 1000000, max_eval_cells: 2, log_every: 1000, threads: {threads}, \
             device: cpu}}\n\
             checkpoint: {{url: {}, every_steps: 1000000}}\n",
            dir.display(),
            work.join("ckpt").display()
        ),
    )?;
    let spec = TrainSpec::load(&yaml)?;
    let opts = RunOptions::default();
    let mut tr = Trainer::new(spec, &opts)?;
    let s = tr.run(&opts)?;
    println!(
        "  {} steps of {batch} cells x 2 views (max_seq_len {}), {threads} intra-op thread(s): \
         {:.1} s, {:.2} s/step; MGEM {:.3} -> {:.3}",
        s.steps_this_run,
        tr.spec.model.max_seq_len,
        s.seconds,
        s.seconds / s.steps_this_run.max(1) as f64,
        s.first_mgem.unwrap_or(f64::NAN),
        s.last_mgem
    );
    let store = scfm_common::storage::Store::open(work.join("ckpt").to_str().unwrap()).unwrap();
    let metrics = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(scfm_common::metrics_log::read_effective(&store))
        .ok()
        .flatten()
        .unwrap_or_default();
    let waits: Vec<f64> = metrics
        .into_iter()
        .filter(|v| v["event"] == "step")
        .filter_map(|v| v["data_wait_s"].as_f64())
        .collect();
    if let Some((first, rest)) = waits.split_first() {
        println!(
            "  data wait: step 1 {:.3} s (start-up: shards opened and checksummed), \
             steps 2..{} {:.2} ms on average",
            first,
            waits.len(),
            rest.iter().sum::<f64>() * 1e3 / rest.len().max(1) as f64
        );
    }
    Ok(s.data_wait_fraction)
}

/// `median (min–max)` of `r`, no decimals.
fn mm(r: &Rates) -> String {
    format!("{:.0} ({:.0}–{:.0})", r.median, r.min, r.max)
}

/// `a / b` of the medians, or why not (a spread beyond `bound`).
fn ratio_text(a: &Rates, b: &Rates, bound: f64) -> String {
    match ratio(a, b, bound) {
        Ok(x) => format!("**{x:.2}×**"),
        Err(e) => e,
    }
}

/// The load average, as printed.
fn load_text() -> String {
    load_average().map_or_else(
        || "unknown".into(),
        |l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]),
    )
}

/// Prints how long a part took since `lap`, and restarts it.
fn took(lap: &mut Instant, part: &str) {
    println!("[{part}: {:.0} s]", lap.elapsed().as_secs_f64());
    *lap = Instant::now();
}

/// The start position of round `r`: runs of `need` cells step through the epoch without
/// wrapping into the next one.
fn position(r: usize, cells: usize, need: usize, n_train: usize) -> usize {
    match n_train.checked_sub(need) {
        Some(room) => r * cells % (room + 1),
        None => 0,
    }
}

fn main() -> Result<()> {
    scfm_common::alloc::tune(); // as the scfm binaries do
    let started = Instant::now();
    let mut lap = started;
    println!("command: cargo bench -p scfm-worker --bench loader");
    println!("load average at start: {}", load_text());
    tch::set_num_threads(1);
    let source_cells = env_usize("SCFM_BENCH_SOURCE_CELLS", CELLS).max(10 * BLOCK);
    let cells = (env_usize("SCFM_BENCH_CELLS", 25_600) / BATCH).max(1) * BATCH;
    let rounds = env_usize("SCFM_BENCH_ROUNDS", 5).max(1);
    let max_spread = std::env::var("SCFM_BENCH_MAX_SPREAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.25);
    let dir = repo().join(".cache/bench/loader");
    std::fs::create_dir_all(&dir)?;
    let src_path = source(&dir, source_cells)?;
    println!(
        "source: {} ({} MB, anndata gzip; {source_cells} cells x {GENES} genes, ~{NNZ_PER_CELL} nnz/cell)",
        src_path.display(),
        std::fs::metadata(&src_path)?.len() >> 20
    );
    let prep = |codec, shuffle, name| prepared(&dir, &src_path, source_cells, codec, shuffle, name);
    let shuffled = prep(Codec::Lzf, true, "lzf-shuffle")?;
    let lzf = prep(Codec::Lzf, false, "lzf")?;
    let none = prep(Codec::None, false, "none")?;
    let mut sets = Vec::new();
    for (name, p, hdf5_decode) in [
        ("lzf + shuffle (default)", &shuffled, false),
        ("lzf", &lzf, false),
        ("none", &none, false),
        ("lzf + shuffle, libhdf5 decoding", &shuffled, true),
    ] {
        if std::env::var("SCFM_BENCH_ONLY").is_ok_and(|only| !name.starts_with(&only)) {
            continue;
        }
        let src = with_hdf5_decoding(hdf5_decode, || -> Result<_> {
            let src = open_source(&data_config(p)?, &scfm_common::runtime::Rt::new()?)?;
            for s in 0..src.shard_cells().len() as u32 {
                src.read(s, 0, 1)?; // opens and verifies every shard before timing
            }
            Ok(src)
        })?;
        sets.push((name, p.clone(), hdf5_decode, src));
    }
    took(&mut lap, "data made, prepared and opened");
    let model = ModelConfig::preset("default")?;
    let n_train = sets
        .first()
        .map_or(0, |s| order_of(&s.3.shard_cells()).n_train());
    let pos = |r: usize| position(r, cells, cells + BATCH, n_train);
    println!(
        "\nloader: 1 thread, tch threads 1, preset `default` tokenizer (max_seq_len {}, {} bins) and \
         default augmentations, batch {BATCH} x 2 views, block/window {BLOCK}/{WINDOW}; per run one \
         untimed start-up batch, then {cells} timed cells; {rounds} rounds, the order of the \
         runs rotated and reversed every other round; round r starts at position {}",
        model.max_seq_len,
        model.n_bins,
        (0..rounds.min(4))
            .map(|r| pos(r).to_string())
            .collect::<Vec<_>>()
            .join(", ")
            + if rounds > 4 { ", ..." } else { "" },
    );
    let mut wall = vec![Vec::new(); sets.len()];
    let mut cpu = vec![Vec::new(); sets.len()];
    let mut proc = vec![Vec::new(); sets.len()];
    for r in 0..rounds {
        for i in round_order(sets.len(), r) {
            let [w, c, p] = loader_run(&sets[i].3, &model, pos(r), cells, None)?;
            wall[i].push(cells as f64 / w);
            cpu[i].push(cells as f64 / c);
            proc[i].push(cells as f64 / p);
        }
    }
    println!("\ncodecs: cells/s, median (min–max) of the rounds:");
    println!(
        "\n| shards | cells/s wall | per CPU-s of the loader thread | per CPU-s of the process |"
    );
    println!("|---|---|---|---|");
    for (i, (name, _, _, _)) in sets.iter().enumerate() {
        println!(
            "| {name} | {} | {} | {} |",
            mm(&Rates::new(name, wall[i].clone())),
            mm(&Rates::new(name, cpu[i].clone())),
            mm(&Rates::new(name, proc[i].clone())),
        );
    }
    took(&mut lap, "codecs");
    let default_set = sets
        .iter()
        .find(|s| s.0.starts_with("lzf + shuffle (default)"));
    if let Some((_, dir_default, _, src)) = default_set {
        if std::env::var("SCFM_BENCH_PYTHON").is_ok_and(|v| v == "0") {
            println!("\nside by side with Python: skipped (SCFM_BENCH_PYTHON=0)");
        } else {
            let s = side_by_side::Settings {
                python: python(),
                script: repo().join("benches/py_loader.py"),
                cells,
                rounds,
                anndata_cells: env_usize("SCFM_BENCH_ANNDATA_CELLS", 2_000),
                max_spread,
            };
            side_by_side::run(&s, dir_default, src, &model, &pos)?;
            took(&mut lap, "side by side");
        }
    }
    println!(
        "\nwhere one loader thread's time goes (single-threaded replica, same cells, µs/cell):"
    );
    println!(
        "| shards | read+decompress | normalise | block lookup | thinning (2 views) | \
         tokenise (2 views) | collate + profiles | total → cells/s | thinning from recovered \
         counts (before) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, p, hdf5_decoding, _) in &sets {
        let s = stages::stages(p, &model, pos(0), cells, *hdf5_decoding)?;
        let us: Vec<f64> = s.iter().map(|x| x * 1e6 / cells as f64).collect();
        let total: f64 = us[..6].iter().sum();
        let cols: Vec<String> = us[..6].iter().map(|u| format!("{u:.1}")).collect();
        println!(
            "| {name} | {} | {total:.1} → {:.0} | {:.1} |",
            cols.join(" | "),
            1e6 / total,
            us[6]
        );
    }
    took(&mut lap, "stages");
    if let Some((_, _, _, src)) = default_set {
        gpu_wait::run(src, &model, cells, rounds, &pos)?;
        took(&mut lap, "data wait at GPU step rates");
    }
    let steps = env_usize("SCFM_BENCH_TRAIN_STEPS", 20);
    let batch = env_usize("SCFM_BENCH_TRAIN_BATCH", 8);
    let threads = env_usize("SCFM_BENCH_TRAIN_THREADS", 1);
    if steps > 0 {
        println!("\ntraining `default` on CPU from prepared-lzf-shuffle, fed by the loader:");
        let work = tempfile::tempdir()?;
        let f = train(&shuffled, work.path(), steps, batch, threads)?;
        println!("  data-wait fraction: **{:.3}%** (target < 2%)", f * 100.0);
        took(&mut lap, "training on CPU");
    }
    println!("\nload average at end: {}", load_text());
    println!("whole run: {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
