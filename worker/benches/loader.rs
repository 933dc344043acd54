//! `cargo bench -p scfm-worker --bench loader`: how fast the training loader delivers
//! shuffled, tokenised two-view batches, compared with anndata's backed mode, and whether
//! it keeps the `default` model fed.
//!
//! 1. Makes (once, cached under `.cache/bench/loader/`) a synthetic 100k cells × 20k
//!    genes source of integer counts (~2k expressed genes per cell, skewed detection and
//!    geometric counts), written by Python anndata with `compression="gzip"`, and
//!    prepares it with `scfm_common::data::prepared::prepare` into shards with codec
//!    `lzf` after HDF5's byte shuffle (the default), plain `lzf`, and `none`.
//! 2. Runs the real [`Loader`] (one thread, `tch::set_num_threads(1)`, the `default`
//!    preset's tokenizer, batch 64, block/window 64/64) on each, interleaved over rounds,
//!    and reports cells/s of wall time, per CPU-second of the loader thread and per
//!    CPU-second of the whole process (the shard reader may decode chunks on a helper
//!    thread). The default shards are also read with `SCFM_H5AD_RAW_CHUNKS=0` (libhdf5 decodes
//!    on the loader thread) to compare both read paths.
//! 3. Times each stage of the loader's work single-threaded (block read + decompression,
//!    normalise, tokenise, collate) on the same cells.
//! 4. Times anndata backed-mode random single-cell access (`a.X[i]`) on the gzip source.
//! 5. Trains the `default` preset for a few steps on CPU fed by the loader and prints the
//!    data-wait fraction (and the first step's wait, which includes opening and
//!    checksumming the shards).
//!
//! Environment: `SCFM_BENCH_CELLS` (cells per loader run, default 25,600),
//! `SCFM_BENCH_ROUNDS` (3), `SCFM_BENCH_ANNDATA_CELLS` (2,000), `SCFM_BENCH_TRAIN_STEPS`
//! (20), `SCFM_BENCH_TRAIN_BATCH` (8), `SCFM_BENCH_TRAIN_THREADS` (1), `SCFM_PYTHON`;
//! `SCFM_BENCH_ONLY=PREFIX` measures only the shard sets whose name starts with it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use scfm_common::config::{Augment, DataConfig, ModelConfig, TrainSpec};
use scfm_common::data::h5ad::MatrixSource;
use scfm_common::data::h5ad::rows::H5adRows;
use scfm_common::data::h5ad::write::Codec;
use scfm_common::data::prepared::{PrepareSettings, PreparedDataset, prepare};
use scfm_common::rng::Rng;
use scfm_common::tokenizer::{Batch, Tokenizer};
use scfm_worker::data::{
    Block, Blocks, CellSource, Loader, LoaderConfig, OrderConfig, SampleOrder, open_source, stream,
};
use scfm_worker::trainer::{RunOptions, Trainer};

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

/// Random single-cell reads in anndata's backed mode (args: file, cells).
const ANNDATA_PY: &str = r#"
import sys, time, json
import numpy as np, anndata as ad
a = ad.read_h5ad(sys.argv[1], backed="r")
idx = np.random.default_rng(1).integers(0, a.n_obs, int(sys.argv[2]))
nnz, w, c = 0, time.perf_counter(), time.process_time()
for i in idx:
    nnz += a.X[int(i)].nnz
print(json.dumps({"cells": len(idx), "wall": time.perf_counter() - w,
                  "cpu": time.process_time() - c, "nnz": nnz}))
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

/// The gzip source, generated when absent.
fn source(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("source-100k-gzip.h5ad");
    if !path.is_file() {
        eprintln!("generating {} with anndata (once)...", path.display());
        let tmp = dir.join("source.tmp.h5ad");
        let t = Instant::now();
        let a = [CELLS, GENES, NNZ_PER_CELL].map(|n| n.to_string());
        let r = run_python(GEN_PY, &[&a[0], &a[1], &a[2], tmp.to_str().unwrap()])?;
        std::fs::rename(&tmp, &path)?;
        eprintln!("  {r} in {:.0} s", t.elapsed().as_secs_f64());
    }
    Ok(path)
}

/// The prepared dataset of `src` with `codec`, prepared when absent; prints its shards.
fn prepared(dir: &Path, src: &Path, codec: Codec, shuffle: bool, name: &str) -> Result<PathBuf> {
    let out = dir.join(format!("prepared-{name}"));
    if !PreparedDataset::is_prepared_dir(&out) {
        let s = PrepareSettings {
            codec,
            shuffle,
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
        augment: Augment::default(),
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

/// One timed loader run of `cells` cells from `position`: wall seconds, CPU seconds of
/// the loader thread, CPU seconds of the whole process (the loader and any helper
/// threads; the main thread only waits).
fn loader_run(
    src: &Arc<dyn CellSource>,
    model: &ModelConfig,
    position: usize,
    cells: usize,
) -> Result<[f64; 3]> {
    let order = order_of(&src.shard_cells());
    let l = Loader::start(src.clone(), order, model, loader_config(), 0, position);
    l.next()?; // start-up (first blocks) not timed
    let (t, c0, p0) = (Instant::now(), thread_cpu_s("scfm-loader"), process_cpu_s());
    for _ in 0..cells / BATCH {
        let d = l.next()?;
        assert_eq!(d.micro[0].n, 2 * BATCH);
    }
    let wall = t.elapsed().as_secs_f64();
    let (c1, p1) = (thread_cpu_s("scfm-loader"), process_cpu_s());
    Ok([wall, delta(c0, c1), delta(p0, p1)])
}

/// Shards read through [`H5adRows`] with the time of each stage counted.
struct Timed {
    rows: Vec<H5adRows>,
    shard_cells: Vec<usize>,
    n_genes: usize,
    read_ns: AtomicU64,
    norm_ns: AtomicU64,
}

impl CellSource for Timed {
    fn shard_cells(&self) -> Vec<usize> {
        self.shard_cells.clone()
    }
    fn n_genes(&self) -> usize {
        self.n_genes
    }
    fn vocab(&self) -> Vec<scfm_common::data::prepared::VocabEntry> {
        (0..self.n_genes)
            .map(|c| scfm_common::data::prepared::VocabEntry {
                gene_id: format!("gene{c}"),
                symbol: format!("gene{c}"),
            })
            .collect()
    }
    fn identity(&self) -> String {
        "timed".into()
    }
    fn read(&self, shard: u32, a: usize, b: usize) -> scfm_worker::Result<Block> {
        let t = Instant::now();
        let x = self.rows[shard as usize].read(a, b)?;
        let t1 = Instant::now();
        let x = Block::from_counts(x, 1e4);
        self.read_ns
            .fetch_add((t1 - t).as_nanos() as u64, Ordering::Relaxed);
        self.norm_ns
            .fetch_add(t1.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(x)
    }
    fn describe(&self) -> String {
        "timed".into()
    }
}

/// Seconds per stage for `cells` cells, single-threaded, the loader's work done by hand:
/// [read+decompress, normalise, block lookup, tokenise, collate].
fn stages(
    dir: &Path,
    model: &ModelConfig,
    position: usize,
    cells: usize,
    hdf5_decoding: bool,
) -> Result<[f64; 5]> {
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
    let timed = Arc::new(Timed {
        rows,
        shard_cells: ds.manifest.shards.iter().map(|s| s.n_cells).collect(),
        n_genes: ds.manifest.n_genes,
        read_ns: AtomicU64::new(0),
        norm_ns: AtomicU64::new(0),
    });
    let mut order = order_of(&timed.shard_cells);
    let src: Arc<dyn CellSource> = timed.clone();
    let mut blocks = Blocks::new(src, BLOCK, loader_config().block_cache());
    let (tok, aug) = (Tokenizer::new(model), Augment::default());
    let (mut locate, mut tokenise, mut collate) = (0.0, 0.0, 0.0);
    for s in 0..cells / BATCH {
        let keyed = order.take(0, position + s * BATCH, BATCH);
        let t = Instant::now();
        let refs: Vec<_> = keyed.iter().map(|k| k.1).collect();
        let located = blocks.locate(&refs)?;
        let t1 = Instant::now();
        let mut seqs = Vec::with_capacity(2 * BATCH);
        for view in 0..2u64 {
            for ((m, r), (e, c)) in located.iter().zip(&keyed) {
                let key = [stream::VIEW, *e, c.shard.into(), c.row.into(), view];
                let (g, v) = m.x.row(*r);
                seqs.push(tok.tokenize(g, v, Some(&aug), true, &mut Rng::new(0, &key)));
            }
        }
        let t2 = Instant::now();
        let b = Batch::collate(&seqs);
        std::hint::black_box(&b);
        (locate, tokenise, collate) = (
            locate + (t1 - t).as_secs_f64(),
            tokenise + (t2 - t1).as_secs_f64(),
            collate + t2.elapsed().as_secs_f64(),
        );
    }
    let read = timed.read_ns.load(Ordering::Relaxed) as f64 * 1e-9;
    let norm = timed.norm_ns.load(Ordering::Relaxed) as f64 * 1e-9;
    Ok([read, norm, locate - read - norm, tokenise, collate])
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

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
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

fn main() -> Result<()> {
    scfm_common::alloc::tune(); // as the scfm binaries do
    println!("command: cargo bench -p scfm-worker --bench loader");
    tch::set_num_threads(1);
    let cells = env_usize("SCFM_BENCH_CELLS", 25_600).max(BATCH);
    let rounds = env_usize("SCFM_BENCH_ROUNDS", 3).max(1);
    let dir = repo().join(".cache/bench/loader");
    std::fs::create_dir_all(&dir)?;
    let src_path = source(&dir)?;
    println!(
        "source: {} ({} MB, anndata gzip; {CELLS} cells x {GENES} genes, ~{NNZ_PER_CELL} nnz/cell)",
        src_path.display(),
        std::fs::metadata(&src_path)?.len() >> 20
    );
    let shuffled = prepared(&dir, &src_path, Codec::Lzf, true, "lzf-shuffle")?;
    let lzf = prepared(&dir, &src_path, Codec::Lzf, false, "lzf")?;
    let none = prepared(&dir, &src_path, Codec::None, false, "none")?;
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
    let model = ModelConfig::preset("default")?;
    println!(
        "\nloader: 1 thread, tch threads 1, preset `default` tokenizer (max_seq_len {}, {} bins), \
         batch {BATCH} x 2 views, block/window {BLOCK}/{WINDOW}, {cells} cells per run, \
         {rounds} interleaved rounds (round r starts at position r x {cells})",
        model.max_seq_len, model.n_bins
    );
    let mut wall = vec![Vec::new(); sets.len()];
    let mut cpu = vec![Vec::new(); sets.len()];
    let mut proc = vec![Vec::new(); sets.len()];
    for r in 0..rounds {
        for (i, (_, _, _, src)) in sets.iter().enumerate() {
            let [w, c, p] = loader_run(src, &model, r * cells % 60_000, cells)?;
            wall[i].push(cells as f64 / w);
            cpu[i].push(cells as f64 / c);
            proc[i].push(cells as f64 / p);
        }
    }
    let n_ad = env_usize("SCFM_BENCH_ANNDATA_CELLS", 2_000);
    let ad = run_python(ANNDATA_PY, &[src_path.to_str().unwrap(), &n_ad.to_string()])?;
    let ad_wall = ad["cells"].as_f64().unwrap_or(0.0) / ad["wall"].as_f64().unwrap_or(1.0);
    let ad_cpu = ad["cells"].as_f64().unwrap_or(0.0) / ad["cpu"].as_f64().unwrap_or(1.0);
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "\n| shards | cells/s, wall (rounds → median) | per CPU-s of the loader thread | \
         per CPU-s of the process | vs anndata backed (wall) |"
    );
    println!("|---|---|---|---|---|");
    for (i, (name, _, _, _)) in sets.iter().enumerate() {
        println!(
            "| {name} | {} → **{:.0}** | {} → **{:.0}** | {} → **{:.0}** | **{:.0}×** |",
            fmt(&wall[i]),
            median(&wall[i]),
            fmt(&cpu[i]),
            median(&cpu[i]),
            fmt(&proc[i]),
            median(&proc[i]),
            median(&wall[i]) / ad_wall
        );
    }
    println!(
        "| anndata backed `a.X[i]`, gzip source, {n_ad} random cells | {ad_wall:.0} | | \
         {ad_cpu:.0} | 1× |"
    );
    println!(
        "\nwhere one loader thread's time goes (single-threaded replica, same cells, µs/cell):"
    );
    println!(
        "| shards | read+decompress | normalise | block lookup | tokenise (2 views) | collate | total → cells/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, p, hdf5_decoding, _) in &sets {
        let s = stages(p, &model, 0, cells, *hdf5_decoding)?;
        let us: Vec<f64> = s.iter().map(|x| x * 1e6 / cells as f64).collect();
        let total: f64 = us.iter().sum();
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {total:.1} → {:.0} |",
            us[0],
            us[1],
            us[2],
            us[3],
            us[4],
            1e6 / total
        );
    }
    let steps = env_usize("SCFM_BENCH_TRAIN_STEPS", 20);
    let batch = env_usize("SCFM_BENCH_TRAIN_BATCH", 8);
    let threads = env_usize("SCFM_BENCH_TRAIN_THREADS", 1);
    if steps > 0 {
        println!("\ntraining `default` on CPU from prepared-lzf-shuffle, fed by the loader:");
        let work = tempfile::tempdir()?;
        let f = train(&shuffled, work.path(), steps, batch, threads)?;
        println!("  data-wait fraction: **{:.3}%** (target < 2%)", f * 100.0);
    }
    Ok(())
}
