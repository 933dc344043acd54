//! Per-step CPU cost of the tokenizer's fast path (an ignored test: a timing to read, not
//! a check).

use super::random_values;
use crate::config::{Augment, ModelConfig};
use crate::rng::Rng;
use crate::telemetry::thread_cpu_s;
use crate::tokenizer::bins::{RankSelect, order_key};
use crate::tokenizer::{CellTokens, Scratch, Tokenizer, dropout};

/// Per-step CPU cost of the fast path on bench-like cells (2,000 skewed counts, the
/// `default` preset, default augmentations): `cargo test --release -p scfm-common
/// substep_timings -- --ignored --nocapture`.
#[test]
#[ignore = "a timing, not a test"]
fn substep_timings() {
    use std::hint::black_box;
    let tok = Tokenizer::new(&ModelConfig::preset("default").unwrap());
    let mut r = Rng::new(2024, &[]);
    let cells: Vec<(Vec<u32>, Vec<f32>)> = (0..1000)
        .map(|_| {
            let g: Vec<u32> = r
                .sample_sorted(20_000, 2000)
                .into_iter()
                .map(|g| g as u32)
                .collect();
            let v = random_values(&mut r, 2000, 0);
            (g, v)
        })
        .collect();
    let n = cells.len();
    let mut s = Scratch::default();
    let aug = Augment::default();
    time(n, &mut s, "tokenize", &mut |i, s| {
        let (g, v) = &cells[i];
        black_box(tok.tokenize_with(g, v, Some(&aug), true, &mut Rng::new(0, &[i as u64]), s));
    });
    time(n, &mut s, "dropout", &mut |i, s| {
        let (g, v) = &cells[i];
        let mut rng = Rng::new(0, &[i as u64]);
        black_box(dropout(g, v, 0.1, &mut rng, &mut s.genes, &mut s.values));
    });
    time(n, &mut s, "binner.fit (1800 values)", &mut |i, s| {
        s.binner.fit(black_box(&cells[i].1[..1800]), 51);
    });
    let mut ranks = RankSelect::default();
    time(n, &mut s, "ranks.load (1800 values)", &mut |i, _| {
        ranks.load(black_box(&cells[i].1[..1800]));
    });
    time(n, &mut s, "order keys + min/max", &mut |i, s| {
        s.perm.clear();
        s.perm
            .extend(cells[i].1[..1800].iter().map(|&v| order_key(v)));
        black_box(
            s.perm
                .iter()
                .fold((u32::MAX, 0), |(a, b), &k| (a.min(k), b.max(k))),
        );
    });
    time(n, &mut s, "sample 511 of 1800", &mut |i, s| {
        let mut rng = Rng::new(0, &[i as u64]);
        rng.sample_sorted_bits(1800, 511, &mut s.perm, &mut s.bits);
        black_box(&s.bits);
    });
    time(n, &mut s, "sample 77 of 511", &mut |i, s| {
        let mut rng = Rng::new(0, &[i as u64]);
        rng.sample_sorted_bits(511, 77, &mut s.perm, &mut s.bits);
        black_box(&s.bits);
    });
    let mut out = Vec::new();
    time(n, &mut s, "binner.fit + bin_all(511)", &mut |i, s| {
        s.binner.fit(&cells[i].1[..1800], 51);
        out.clear();
        s.binner.bin_all(black_box(&cells[i].1[..511]), &mut out);
        black_box(&out);
    });
    let mut fitted = Scratch::default();
    fitted.binner.fit(&cells[0].1[..1800], 51);
    time(n, &mut s, "bin_all(511) only", &mut |i, _| {
        out.clear();
        fitted
            .binner
            .bin_all(black_box(&cells[i].1[..511]), &mut out);
        black_box(&out);
    });
    time(n, &mut s, "6 columns of 512", &mut |_, _| {
        black_box(CellTokens {
            genes: Vec::with_capacity(512),
            input_bins: Vec::with_capacity(512),
            target_bins: Vec::with_capacity(512),
            input_values: Vec::with_capacity(512),
            target_values: Vec::with_capacity(512),
            masked: Vec::with_capacity(512),
        });
    });
}

/// Prints the best of 15 rounds of `f` over cells `0..n`, in CPU µs per call.
fn time(n: usize, s: &mut Scratch, what: &str, f: &mut dyn FnMut(usize, &mut Scratch)) {
    let mut best = f64::INFINITY;
    for _ in 0..15 {
        let t = thread_cpu_s();
        for i in 0..n {
            f(i, s);
        }
        best = best.min((thread_cpu_s() - t) * 1e6 / n as f64);
    }
    println!("{what:<28} {best:6.2} µs per view");
}
