//! `cargo bench -p scfm-coordinator --bench prepare`: wall time, throughput and peak memory
//! of the built `scfm prepare` binary on 100k and 1M cells.
//!
//! Inputs are generated once and cached under `.cache/bench/prepare/` with the crate's
//! h5ad writer (anndata encoding, LZF chunks as anndata/h5py write them with
//! `compression="lzf"`): 20,000 genes, integer counts with skewed gene detection (a
//! power law over a fixed random permutation of the genes) and geometric counts.
//! - `100k x 2000`: one file of 100k cells with ~2,000 expressed genes each;
//! - `100k x 500`: one file of 100k cells with ~500 (the first part of the next);
//! - `1M x 500`: ten files of 100k cells with ~500 each (fewer non-zeros keep the
//!   generated data within a few GB).
//!
//! When the loader benchmark's anndata gzip source is cached it is prepared too.
//!
//! Each run executes `scfm prepare INPUTS --out DIR` (default settings: 20,000-cell LZF
//! shards, 4,096-cell read blocks) and samples the child's `/proc/<pid>/status` (VmHWM)
//! and `/proc/<pid>/stat` (CPU) every 20 ms. `prepare` keeps one shard being filled plus
//! one read block in memory, so peak RSS should not grow from 100k to 1M cells at the
//! same non-zeros per cell. `SCFM_BENCH_ROUNDS` (default 1) repeats the runs interleaved.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scfm_common::data::CsrMatrix;
use scfm_common::data::h5ad::write::{Codec, ShardContents, WriteOptions, write_h5ad};
use scfm_common::rng::Rng;

const GENES: usize = 20_000;
const FILE_CELLS: usize = 100_000;
/// Cells per shard (`PrepareSettings::default().shard_cells`).
const SHARD_CELLS: usize = 20_000;

fn repo() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    p.canonicalize().unwrap_or(p)
}

/// Writes one input file of `FILE_CELLS` cells with about `nnz` genes each (stream `part`).
fn generate(path: &Path, nnz: usize, part: u64) -> Result<()> {
    let mut rng = Rng::new(20_261_127, &[nnz as u64, part]);
    // Gene identity of each detection rank (the same for every file).
    let mut perm: Vec<u32> = (0..GENES as u32).collect();
    Rng::new(7, &[]).shuffle(&mut perm);
    let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
    let mut seen = vec![false; GENES];
    let mut row: Vec<(u32, f32)> = Vec::new();
    for _ in 0..FILE_CELLS {
        // Cell size factor: log-normal(0, 0.3) with mean 1.
        let size = (0.3 * rng.normal() - 0.045).exp();
        let want = ((nnz as f64 * size).round() as usize).clamp(1, GENES / 2);
        row.clear();
        while row.len() < want {
            // Power-law rank: low ranks (housekeeping genes) are in most cells.
            let rank = (GENES as f64 * rng.uniform().powf(1.6)) as usize;
            if seen[rank] {
                continue;
            }
            seen[rank] = true;
            let mean = 1.5 * size * (GENES as f64 / (rank as f64 + 20.0)).powf(0.5);
            let p = 1.0 / (1.0 + mean);
            let count = 1.0 + ((1.0 - rng.uniform()).ln() / (1.0 - p).ln()).floor();
            row.push((rank as u32, count as f32));
        }
        for e in row.iter_mut() {
            seen[e.0 as usize] = false;
            e.0 = perm[e.0 as usize];
        }
        row.sort_unstable_by_key(|e| e.0);
        indices.extend(row.iter().map(|e| e.0));
        data.extend(row.iter().map(|e| e.1));
        indptr.push(indices.len() as u64);
    }
    let x = CsrMatrix::new("synthetic", FILE_CELLS, GENES, indptr, indices, data)?;
    let obs: Vec<String> = (0..FILE_CELLS)
        .map(|i| format!("p{part}-cell-{i:07}"))
        .collect();
    let var: Vec<String> = (0..GENES).map(|j| format!("G{j:05}")).collect();
    write_h5ad(
        path,
        &ShardContents {
            x: &x,
            obs_names: &obs,
            var_names: &var,
            var_columns: &[],
            obs_columns: &[],
        },
        &WriteOptions {
            codec: Codec::Lzf,
            ..WriteOptions::default()
        },
    )?;
    Ok(())
}

/// The cached input files `name-00.h5ad ..` (`files` of them), generated when absent.
fn inputs(dir: &Path, nnz: usize, files: usize) -> Result<Vec<PathBuf>> {
    (0..files)
        .map(|i| {
            let p = dir.join(format!("in-{nnz}nnz-{i:02}.h5ad"));
            if !p.is_file() {
                let t = Instant::now();
                generate(&p, nnz, i as u64)?;
                eprintln!(
                    "generated {} in {:.1} s",
                    p.display(),
                    t.elapsed().as_secs_f64()
                );
            }
            Ok(p)
        })
        .collect()
}

/// What one `scfm prepare` run cost.
struct Run {
    wall: f64,
    cpu: f64,
    peak_rss: u64,
    shard_bytes: Vec<u64>,
    /// Stored values written (from `dataset.json`).
    nnz: u64,
}

/// `(VmHWM bytes, utime + stime seconds)` of a live process.
fn sample(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((hwm * 1024, ticks as f64 / 100.0))
}

fn run_prepare(scfm: &Path, inputs: &[PathBuf], out: &Path, log: &Path) -> Result<Run> {
    let _ = std::fs::remove_dir_all(out);
    let t = Instant::now();
    let mut child = Command::new(scfm)
        .arg("prepare")
        .args(inputs)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {}", scfm.display()))?;
    let (mut peak, mut cpu) = (0, 0.0);
    let status = loop {
        if let Some((h, c)) = sample(child.id()) {
            (peak, cpu) = (peak.max(h), c);
        }
        if let Some(s) = child.try_wait()? {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("scfm prepare failed ({status}); see {}", log.display());
    }
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("dataset.json"))?)?;
    let shard_bytes = m["shards"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["bytes"].as_u64()).collect())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(out);
    Ok(Run {
        wall,
        cpu,
        peak_rss: peak,
        shard_bytes,
        nnz: m["nnz"].as_u64().unwrap_or(0),
    })
}

fn main() -> Result<()> {
    println!("command: cargo bench -p scfm-coordinator --bench prepare");
    let scfm = PathBuf::from(env!("CARGO_BIN_EXE_scfm"));
    let dir = repo().join(".cache/bench/prepare");
    std::fs::create_dir_all(&dir)?;
    let rounds: usize = std::env::var("SCFM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let big = inputs(&dir, 2_000, 1)?;
    let small = inputs(&dir, 500, 10)?;
    // (label, nnz/cell, files)
    let mut sets: Vec<(String, usize, Vec<PathBuf>)> = vec![
        ("100k x 2000 nnz, 1 lzf file".into(), 2_000, big),
        (
            "100k x 500 nnz, 1 lzf file".into(),
            500,
            small[..1].to_vec(),
        ),
        ("1M x 500 nnz, 10 lzf files".into(), 500, small),
    ];
    let gz = repo().join(".cache/bench/loader/source-100k-gzip.h5ad");
    if gz.is_file() {
        sets.push(("100k x 2000 nnz, anndata gzip".into(), 2_000, vec![gz]));
    }
    println!("binary: {}", scfm.display());
    let mut runs: Vec<Vec<Run>> = sets.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, (label, _, files)) in sets.iter().enumerate() {
            eprintln!("scfm prepare: {label}...");
            let out = dir.join("out");
            runs[i].push(run_prepare(&scfm, files, &out, &dir.join("prepare.log"))?);
        }
    }
    println!(
        "\n`scfm prepare IN... --out DIR` (defaults: byte-shuffled lzf, {SHARD_CELLS}-cell shards); \
         median of {rounds} round(s)"
    );
    println!(
        "| input | cells | nnz/cell | input MB | wall s | cells/s | M nnz/s | CPU s | \
         peak RSS MB | one shard's CSR MB | shards: n x MB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for ((label, nnz, files), rs) in sets.iter().zip(&runs) {
        let mut order: Vec<usize> = (0..rs.len()).collect();
        order.sort_by(|&a, &b| rs[a].wall.total_cmp(&rs[b].wall));
        let r = &rs[order[rs.len() / 2]];
        let cells = files.len() * FILE_CELLS;
        let in_mb: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .sum::<u64>()
            >> 20;
        let lo = r.shard_bytes.iter().min().copied().unwrap_or(0) >> 20;
        let hi = r.shard_bytes.iter().max().copied().unwrap_or(0) >> 20;
        println!(
            "| {label} | {cells} | {:.0} | {in_mb} | {:.1} | {:.0} | {:.1} | {:.1} | {} | {} | \
             {} x {}..{} |",
            r.nnz as f64 / cells as f64,
            r.wall,
            cells as f64 / r.wall,
            r.nnz as f64 / r.wall / 1e6,
            r.cpu,
            r.peak_rss >> 20,
            (SHARD_CELLS * nnz * 8) >> 20,
            r.shard_bytes.len(),
            lo,
            hi,
        );
    }
    Ok(())
}
