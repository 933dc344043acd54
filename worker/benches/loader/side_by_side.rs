//! scfm's loader and its stages side by side with Python baselines (issue 14): the same
//! prepared shards, the same cells in the same order, the same 64-row blocks read in the
//! order the cells first need them.
//!
//! Each round writes the cells of one loader run (`SampleOrder::take` from the round's
//! position: an untimed start-up batch, then the timed cells) to a file, and every side
//! works through exactly those cells:
//!
//! - scfm read: the blocks the timed cells first need, read through [`H5adRows`] opened
//!   as the loader's source opens them (decoding on the reading thread), afresh for each
//!   run as the Python side opens its files;
//! - scfm read + normalise: the same, then [`Block::from_counts`] (normalize_total to
//!   1e4 and log1p, each row's depth);
//! - scfm loader: the real [`Loader`], 1 thread, checked to deliver exactly the file's
//!   cells;
//! - the sides of `benches/py_loader.py` (one Python process, started once and kept warm:
//!   h5py read, h5py + numpy normalise, anndata backed `X[a:a+64]`, the numpy loader,
//!   anndata backed `X[i]` per cell with `X` hoisted).
//!
//! Each side reports cells per wall second and per CPU-second of its own process (Rust:
//! `/proc/self/stat`; Python: `time.process_time`); the other process only waits on a pipe
//! meanwhile. The sides run in [`round_order`] (rotated, reversed every other round).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use scfm_common::config::ModelConfig;
use scfm_common::data::h5ad::rows::H5adRows;
use scfm_worker::bench_protocol::{Rates, round_order};
use scfm_worker::data::{Block, CellSource, Keyed};

use super::{BATCH, BLOCK, loader_run, mm, open_rows, order_of, process_cpu_s, ratio_text};

/// What the comparison runs with.
pub struct Settings {
    /// The Python with h5py, anndata and numpy.
    pub python: PathBuf,
    /// `benches/py_loader.py`.
    pub script: PathBuf,
    /// Timed cells per run.
    pub cells: usize,
    /// Rounds.
    pub rounds: usize,
    /// Timed cells of the per-cell anndata side (it is ~100× slower).
    pub anndata_cells: usize,
    /// No ratio where a side's spread, (max − min) / median, is beyond this.
    pub max_spread: f64,
}

/// One timed run of a side.
#[derive(Clone, Copy)]
struct Run {
    cells: f64,
    wall: f64,
    cpu: f64,
}

/// The Python side, warm between runs.
struct Py {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Py {
    /// Starts `script DATASET` and waits for its ready line.
    fn start(s: &Settings, dataset: &Path) -> Result<(Py, serde_json::Value)> {
        let mut child = Command::new(&s.python)
            .arg(&s.script)
            .arg(dataset)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", s.python.display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut py = Py {
            child,
            stdin,
            stdout,
        };
        let ready = py.reply()?;
        if ready["ready"] != true {
            bail!("py_loader.py: {ready}");
        }
        Ok((py, ready))
    }

    fn reply(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("py_loader.py exited (its error is above)");
        }
        serde_json::from_str(&line).with_context(|| format!("py_loader.py printed {line:?}"))
    }

    fn run(&mut self, side: &str, cells: &Path, limit: usize) -> Result<Run> {
        writeln!(self.stdin, "run {side} {} {limit}", cells.display())?;
        self.stdin.flush()?;
        let v = self.reply()?;
        let f = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("{side}: no {k} in {v}"))
        };
        Ok(Run {
            cells: f("cells")?,
            wall: f("wall")?,
            cpu: f("cpu")?,
        })
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// A side of the comparison.
#[derive(Clone, Copy)]
enum Side {
    ScfmRead,
    ScfmNorm,
    ScfmLoader,
    /// A side of `py_loader.py`; `true` for the per-cell side (fewer cells).
    Py(&'static str, bool),
}

/// (short name, what it does, side).
const SIDES: [(&str, &str, Side); 8] = [
    (
        "scfm read",
        "`H5adRows::read` of each block, decoding on the reading thread",
        Side::ScfmRead,
    ),
    (
        "h5py read",
        "`indices[lo:hi]`, `data[lo:hi]` of each block",
        Side::Py("h5py-read", false),
    ),
    (
        "anndata blocks",
        "backed `X[a:a+64]` of each block, `X` hoisted",
        Side::Py("anndata-block", false),
    ),
    (
        "scfm read + normalise",
        "the read, then `Block::from_counts` (normalize_total 1e4, log1p, depths)",
        Side::ScfmNorm,
    ),
    (
        "h5py + numpy normalise",
        "the h5py read, then the same in numpy (float32)",
        Side::Py("h5py-norm", false),
    ),
    (
        "scfm loader",
        "the real `Loader`, 1 thread: read, normalise, thin, tokenise, collate",
        Side::ScfmLoader,
    ),
    (
        "numpy loader",
        "`py_loader.py`: the same work in vectorised numpy over h5py reads",
        Side::Py("numpy-loader", false),
    ),
    (
        "anndata cells",
        "backed `X[i]` per cell, `X` hoisted (reads only)",
        Side::Py("anndata-cells", true),
    ),
];

/// (scfm side, baseline) pairs whose ratio is printed.
const RATIOS: [(usize, usize); 5] = [(0, 1), (0, 2), (3, 4), (5, 6), (5, 7)];

/// The blocks `(shard, block)` the cells after the start-up batch read first, in order.
fn first_touched(cells: &[Keyed]) -> Vec<(u32, usize)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, (_, c)) in cells.iter().enumerate() {
        let key = (c.shard, c.row as usize / BLOCK);
        if seen.insert(key) && i >= BATCH {
            out.push(key);
        }
    }
    out
}

/// Reads `blocks` of the shards at `dir` (and normalises them when `norm`), the shards
/// opened afresh (untimed), as the Python side opens them for each run.
fn scfm_read(dir: &Path, blocks: &[(u32, usize)], cells: usize, norm: bool) -> Result<Run> {
    let (rows, _, _): (Vec<H5adRows>, _, _) = open_rows(dir, false)?;
    let (t, p0) = (Instant::now(), process_cpu_s());
    let mut check = 0usize;
    for &(s, b) in blocks {
        let r = &rows[s as usize];
        let a = b * BLOCK;
        let x = r.read(a, (a + BLOCK).min(r.n_rows()))?;
        check += if norm {
            Block::from_counts(x, 1e4).x.data.len()
        } else {
            x.data.len()
        };
    }
    std::hint::black_box(check);
    let wall = t.elapsed().as_secs_f64();
    Ok(Run {
        cells: cells as f64,
        wall,
        cpu: super::delta(p0, process_cpu_s()),
    })
}

/// Runs the comparison on the prepared dataset at `dir` (`src`: its loader source, open
/// and verified); round `r` starts at `position(r)`.
pub fn run(
    s: &Settings,
    dir: &Path,
    src: &Arc<dyn CellSource>,
    model: &ModelConfig,
    position: &dyn Fn(usize) -> usize,
) -> Result<()> {
    let (mut py, ready) = Py::start(s, dir)?;
    let mut order = order_of(&src.shard_cells());
    let work = tempfile::tempdir()?;
    let cells_file = work.path().join("cells.u32");
    println!(
        "\nside by side on {} (same cells, same order, same blocks; Python {}: numpy {}, h5py \
         {}, anndata {}), {} rounds, {} timed cells per run ({} for the per-cell anndata side):",
        dir.display(),
        s.python.display(),
        ready["numpy"].as_str().unwrap_or("?"),
        ready["h5py"].as_str().unwrap_or("?"),
        ready["anndata"].as_str().unwrap_or("?"),
        s.rounds,
        s.cells,
        s.anndata_cells.min(s.cells),
    );
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); SIDES.len()];
    for r in 0..s.rounds {
        let pos = position(r);
        let cells = order.take(0, pos, s.cells + BATCH);
        let bytes: Vec<u8> = cells
            .iter()
            .flat_map(|(_, c)| [c.shard, c.row])
            .flat_map(u32::to_le_bytes)
            .collect();
        std::fs::write(&cells_file, bytes)?;
        let blocks = first_touched(&cells);
        let mut line = format!("  round {r} (position {pos}, {} blocks):", blocks.len());
        for i in round_order(SIDES.len(), r) {
            let run = match SIDES[i].2 {
                Side::ScfmRead => scfm_read(dir, &blocks, s.cells, false)?,
                Side::ScfmNorm => scfm_read(dir, &blocks, s.cells, true)?,
                Side::ScfmLoader => {
                    let [wall, _, cpu] = loader_run(src, model, pos, s.cells, Some(&cells))?;
                    Run {
                        cells: s.cells as f64,
                        wall,
                        cpu,
                    }
                }
                Side::Py(name, per_cell) => {
                    let limit = if per_cell { s.anndata_cells } else { 0 };
                    py.run(name, &cells_file, limit)?
                }
            };
            line += &format!(" {}: {:.0}/s;", SIDES[i].0, run.cells / run.wall);
            runs[i].push(run);
        }
        eprintln!("{line}");
    }
    let rates = |f: fn(&Run) -> f64| -> Vec<Rates> {
        SIDES
            .iter()
            .zip(&runs)
            .map(|((name, _, _), rs)| Rates::new(name, rs.iter().map(f).collect()))
            .collect()
    };
    let wall = rates(|r| r.cells / r.wall);
    let cpu = rates(|r| r.cells / r.cpu);
    let cores = rates(|r| r.cpu / r.wall);
    println!(
        "\n| # | side | what it does | cells/s wall, median (min–max) | cells per CPU-s of its \
         process | CPU-s per wall s |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, (name, what, _)) in SIDES.iter().enumerate() {
        println!(
            "| {i} | {name} | {what} | {} | {} | {:.2} |",
            mm(&wall[i]),
            mm(&cpu[i]),
            cores[i].median
        );
    }
    println!("\n| scfm / baseline | wall | per CPU-s |");
    println!("|---|---|---|");
    for (a, b) in RATIOS {
        println!(
            "| {} / {} | {} | {} |",
            SIDES[a].0,
            SIDES[b].0,
            ratio_text(&wall[a], &wall[b], s.max_spread),
            ratio_text(&cpu[a], &cpu[b], s.max_spread),
        );
    }
    Ok(())
}
