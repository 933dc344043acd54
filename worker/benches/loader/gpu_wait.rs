//! The loader's data wait at GPU step rates (issue 14): a consumer whose "step" is a
//! sleep as long as a `default` step of the bench's batch would take on a GPU, fed by the
//! real [`Loader`] with `data.loader_threads` 1, 2, 3, 4.
//!
//! The step time is derived, not measured: the training FLOPs of the batch
//! (`3 × forward_flops` per sequence — backward at twice the forward — for each of its
//! `2 × batch` sequences at the batch's padded length) at an assumed sustained rate,
//! `SCFM_BENCH_GPU_MFU` (0.4) of `SCFM_BENCH_GPU_PEAK_TFLOPS` (989: the H200's dense bf16
//! peak). The sleep uses no CPU, so the loader has the machine's cores to itself; a real
//! trainer's thread also launches kernels and copies each batch to the device.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use scfm_common::config::ModelConfig;
use scfm_worker::bench_embed::forward_flops;
use scfm_worker::bench_protocol::{Rates, round_order};
use scfm_worker::data::{CellSource, Loader, LoaderConfig};

use super::{BATCH, loader_config, order_of, process_cpu_s};

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seconds of a training step of `seqs` sequences of `len` tokens at `flops_per_s`.
fn step_seconds(model: &ModelConfig, seqs: usize, len: usize, flops_per_s: f64) -> f64 {
    3.0 * forward_flops(model, len) * seqs as f64 / flops_per_s
}

/// One run's totals.
struct Wait {
    /// Seconds blocked in `Loader::next`.
    wait: f64,
    /// Wall seconds of the timed steps.
    wall: f64,
    /// CPU seconds of the process (the loader's threads; the consumer sleeps).
    cpu: f64,
    cells: f64,
}

/// `cells / BATCH` steps of a consumer sleeping each batch's step time, after an untimed
/// start-up batch.
fn consume(
    src: &Arc<dyn CellSource>,
    model: &ModelConfig,
    cfg: LoaderConfig,
    position: usize,
    cells: usize,
    flops_per_s: f64,
) -> Result<Wait> {
    let order = order_of(&src.shard_cells());
    let l = Loader::start(src.clone(), order, model, cfg, 0, position);
    l.next()?; // start-up (opening, first blocks) not timed
    let (t, p0) = (Instant::now(), process_cpu_s());
    let mut wait = 0.0;
    for _ in 0..cells / BATCH {
        let t0 = Instant::now();
        let d = l.next()?;
        wait += t0.elapsed().as_secs_f64();
        let b = &d.micro[0];
        std::thread::sleep(Duration::from_secs_f64(step_seconds(
            model,
            b.n,
            b.len,
            flops_per_s,
        )));
    }
    Ok(Wait {
        wait,
        wall: t.elapsed().as_secs_f64(),
        cpu: super::delta(p0, process_cpu_s()),
        cells: (cells / BATCH * BATCH) as f64,
    })
}

/// Runs every thread count `rounds` times in rotated order and prints the table.
pub fn run(
    src: &Arc<dyn CellSource>,
    model: &ModelConfig,
    cells: usize,
    rounds: usize,
    position: &dyn Fn(usize) -> usize,
) -> Result<()> {
    let peak = env_f64("SCFM_BENCH_GPU_PEAK_TFLOPS", 989.0);
    let mfu = env_f64("SCFM_BENCH_GPU_MFU", 0.4);
    let flops_per_s = peak * mfu * 1e12;
    let threads: Vec<usize> = std::env::var("SCFM_BENCH_GPU_THREADS")
        .unwrap_or_else(|_| "1,2,3,4".into())
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .filter(|&t| t > 0)
        .collect();
    let len = model.max_seq_len;
    let step = step_seconds(model, 2 * BATCH, len, flops_per_s);
    let gpu_rate = BATCH as f64 / step;
    println!(
        "\ndata wait at GPU step rates: a consumer sleeping one `default` training step per \
         batch; assumed: {mfu} × {peak} TFLOP/s dense bf16 (an H200) = {:.1} TFLOP/s \
         sustained; a step of {BATCH} cells × 2 views × {len} tokens = 3 × forward_flops × {} \
         sequences = {:.2} TFLOP → {:.2} ms (each batch sleeps for its own padded length), \
         so the GPU would consume {gpu_rate:.0} cells/s; {cells} timed cells per run, {rounds} \
         rounds, {} logical CPUs",
        peak * mfu,
        2 * BATCH,
        3.0 * forward_flops(model, len) * (2 * BATCH) as f64 / 1e12,
        step * 1e3,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let mut runs: Vec<Vec<Wait>> = threads.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        let mut line = format!("  round {r}:");
        for i in round_order(threads.len(), r) {
            let cfg = LoaderConfig {
                threads: threads[i],
                ..loader_config()
            };
            let w = consume(src, model, cfg, position(r), cells, flops_per_s)?;
            line += &format!(
                " threads {} wait {:.2}% {:.0} cells/s;",
                threads[i],
                100.0 * w.wait / w.wall,
                w.cells / w.wall
            );
            runs[i].push(w);
        }
        eprintln!("{line}");
    }
    println!(
        "\n| data.loader_threads | data-wait fraction, median (min–max) | cells/s consumed | \
         loader CPU-s per wall s |"
    );
    println!("|---|---|---|---|");
    for (t, ws) in threads.iter().zip(&runs) {
        let f = Rates::new("wait", ws.iter().map(|w| 100.0 * w.wait / w.wall).collect());
        let c = Rates::new("cells", ws.iter().map(|w| w.cells / w.wall).collect());
        let cores = Rates::new("cores", ws.iter().map(|w| w.cpu / w.wall).collect());
        println!(
            "| {t} | {:.2}% ({:.2}–{:.2}%) | {} | {:.2} |",
            f.median,
            f.min,
            f.max,
            super::mm(&c),
            cores.median
        );
    }
    println!(
        "target: data wait < 2% at the {gpu_rate:.0} cells/s the assumed GPU consumes \
         (cells/s consumed >= {:.0})",
        0.98 * gpu_rate
    );
    Ok(())
}
