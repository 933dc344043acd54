//! Speed of [`Tokenizer::tokenize`]: both contrastive views of synthetic cells with 2,000
//! expressed genes (of 20,000), skewed integer counts normalised to 1e4 and log1p'd, with
//! the `default` model preset (max_seq_len, n_bins, mask_ratio) and `Augment::default()`
//! (gene dropout 0.1), against a private copy of the previous implementation.
//!
//! `cargo bench -p scfm-common --bench tokenize` first checks that both produce identical
//! views (and leave the streams in the same state), then runs interleaved rounds (old,
//! then new) over the same cells and streams, prints each round and the medians in µs per
//! cell (both views) of thread CPU time (the per-core cost) and of wall time, and
//! old / new, then the fastest round of each. `SCFM_BENCH_ROUNDS` (default 7) and
//! `SCFM_BENCH_CELLS` (cells per round, default 2000) change the work,
//! `SCFM_BENCH_TAIL_PERCENT` (default 10) the share of genes with log-normal rather than
//! geometric counts (more distinct values); `SCFM_BENCH_ONLY=old|new` times one of them
//! only (for profiling). One thread.

use std::time::Instant;

use scfm_common::config::{Augment, ModelConfig};
use scfm_common::rng::Rng;
use scfm_common::telemetry::thread_cpu_s;
use scfm_common::tokenizer::reference::reference_tokenize;
use scfm_common::tokenizer::{CellTokens, Tokenizer};

const GENES: usize = 20_000;
const PER_CELL: usize = 2_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Synthetic cells: 2,000 distinct sorted genes; counts 1 + geometric(0.4) for a fraction
/// `1 - tail` of them and a log-normal tail (median ~7) for the rest; values
/// log1p(count / total * 1e4).
fn cells(n: usize, tail: f64) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut rng = Rng::new(2024, &[]);
    (0..n)
        .map(|_| {
            let genes: Vec<u32> = rng
                .sample_sorted(GENES, PER_CELL)
                .into_iter()
                .map(|g| g as u32)
                .collect();
            let counts: Vec<f64> = (0..PER_CELL)
                .map(|_| {
                    if rng.uniform() >= tail {
                        let u = 1.0 - rng.uniform();
                        1.0 + (u.ln() / 0.6f64.ln()).floor()
                    } else {
                        (2.0 + 1.5 * rng.normal()).exp().ceil().max(1.0)
                    }
                })
                .collect();
            let total: f64 = counts.iter().sum();
            let values = counts
                .iter()
                .map(|c| (c / total * 1e4).ln_1p() as f32)
                .collect();
            (genes, values)
        })
        .collect()
}

/// One view: (genes, values, stream) -> tokens.
trait Tokenize: Fn(&[u32], &[f32], &mut Rng) -> CellTokens {}
impl<F: Fn(&[u32], &[f32], &mut Rng) -> CellTokens> Tokenize for F {}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn main() {
    let model = ModelConfig::preset("default").expect("default preset");
    let tok = Tokenizer::new(&model);
    let aug = Augment::default();
    let (rounds, n) = (env("SCFM_BENCH_ROUNDS", 7), env("SCFM_BENCH_CELLS", 2000));
    let tail = env("SCFM_BENCH_TAIL_PERCENT", 10) as f64 / 100.0;
    let data = cells(n, tail);
    println!(
        "tokenize: {n} cells x 2 views, {PER_CELL} genes/cell ({}% log-normal tail), \
         max_seq_len {}, n_bins {}, mask_ratio {}, gene_dropout {}",
        100.0 * tail,
        tok.max_seq_len,
        tok.n_bins,
        tok.mask_ratio,
        aug.gene_dropout
    );
    // (CPU µs, wall µs) per cell, both views.
    let run = |f: &dyn Tokenize| -> (f64, f64) {
        let (t, c) = (Instant::now(), thread_cpu_s());
        let mut tokens = 0usize;
        for (i, (g, v)) in data.iter().enumerate() {
            for view in 0..2u64 {
                let mut rng = Rng::new(0, &[1, 0, 0, i as u64, view]);
                tokens += std::hint::black_box(f(g, v, &mut rng)).genes.len();
            }
        }
        assert_eq!(tokens, 2 * n * tok.max_seq_len);
        let per = 1e6 / n as f64;
        ((thread_cpu_s() - c) * per, t.elapsed().as_secs_f64() * per)
    };
    let old =
        |g: &[u32], v: &[f32], r: &mut Rng| reference_tokenize(&tok, g, v, Some(&aug), true, r);
    let new = |g: &[u32], v: &[f32], r: &mut Rng| tok.tokenize(g, v, Some(&aug), true, r);
    // The rewrite must not change a single token: compare once before timing.
    for (i, (g, v)) in data.iter().enumerate() {
        for view in 0..2u64 {
            let key = [1, 0, 0, i as u64, view];
            let (mut a, mut b) = (Rng::new(0, &key), Rng::new(0, &key));
            assert_eq!(old(g, v, &mut a), new(g, v, &mut b), "cell {i} view {view}");
            assert_eq!(a, b, "cell {i} view {view}: stream state");
        }
    }
    if let Ok(only) = std::env::var("SCFM_BENCH_ONLY") {
        // For profiling one implementation: `SCFM_BENCH_ONLY=new perf record ...`.
        let f: &dyn Tokenize = if only == "old" { &old } else { &new };
        let t: Vec<f64> = (0..rounds).map(|_| run(f).0).collect();
        let best = t.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "{only}: median {:.1} CPU µs/cell, best {best:.1}",
            median(&t)
        );
        return;
    }
    run(&old);
    run(&new);
    let (mut o, mut w) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        o.push(run(&old));
        w.push(run(&new));
        println!(
            "round {r}: old {:.1} µs/cell ({:.1} wall), new {:.1} µs/cell ({:.1} wall)",
            o[r].0, o[r].1, w[r].0, w[r].1
        );
    }
    let col = |v: &[(f64, f64)], wall: bool| -> Vec<f64> {
        v.iter().map(|x| if wall { x.1 } else { x.0 }).collect()
    };
    for (what, wall) in [("CPU", false), ("wall", true)] {
        let (mo, mw) = (median(&col(&o, wall)), median(&col(&w, wall)));
        println!(
            "median {what}: old {mo:.1} µs/cell ({:.0} cells/s), new {mw:.1} µs/cell \
             ({:.0} cells/s), old/new {:.2}x",
            1e6 / mo,
            1e6 / mw,
            mo / mw
        );
    }
    // The least disturbed round of each (a busy machine only ever adds time).
    let best = |v: &[(f64, f64)]| v.iter().map(|x| x.0).fold(f64::INFINITY, f64::min);
    let (bo, bw) = (best(&o), best(&w));
    println!(
        "best CPU: old {bo:.1} µs/cell, new {bw:.1} µs/cell, old/new {:.2}x",
        bo / bw
    );
}
