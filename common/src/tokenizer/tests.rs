//! Tests of the tokenizer, chiefly that it draws and computes exactly what the plain
//! reference implementation in [`super::reference`] does.

#[cfg(target_os = "linux")]
mod timing;

use super::bins::{RankSelect, from_order_key, order_key};
use super::reference::{reference_bins, reference_tokenize};
use super::*;

#[test]
fn bins_match_numpy_quantile_digitize() {
    // numpy: edges = np.quantile([1,2,3,4,5], np.linspace(0,1,4)) = [1, 2.333, 3.667, 5]
    // bins = 1 + (#edges < v) = 1 + np.digitize(v, edges, right=True) = [1, 2, 3, 4, 4].
    assert_eq!(
        quantile_bins(&[1.0, 2.0, 3.0, 4.0, 5.0], 5),
        vec![1, 2, 3, 4, 4]
    );
    assert_eq!(quantile_bins(&[3.0, 3.0, 3.0], 51), vec![1, 1, 1]);
    assert_eq!(quantile_bins(&[], 51), Vec::<i64>::new());
    let b = quantile_bins(&(0..1000).map(|x| x as f32).collect::<Vec<_>>(), 51);
    assert_eq!((b[0], b[999]), (1, 50));
    assert!(b.windows(2).all(|w| w[0] <= w[1]));
}

fn tok(max: usize) -> Tokenizer {
    Tokenizer {
        max_seq_len: max,
        expression: ExpressionEncoding::Binned,
        n_bins: 11,
        mask_ratio: 0.25,
        subsample: Subsample::Random,
    }
}

#[test]
fn tokenize_subsamples_masks_and_keeps_cls() {
    let genes: Vec<u32> = (0..100).collect();
    let vals: Vec<f32> = (0..100).map(|x| 1.0 + x as f32).collect();
    let t = tok(17).tokenize(&genes, &vals, None, true, &mut Rng::new(1, &[]));
    assert_eq!(t.genes.len(), 17);
    assert_eq!(
        (t.genes[0], t.input_bins[0], t.masked[0]),
        (special::CLS, 0, false)
    );
    assert_eq!(t.masked.iter().filter(|&&m| m).count(), 4); // round(0.25 * 16)
    for i in 1..17 {
        assert!(t.genes[i] >= special::OFFSET && t.genes[i] < 100 + special::OFFSET);
        assert!((1..=10).contains(&t.target_bins[i]));
        assert_eq!(
            t.input_bins[i],
            if t.masked[i] { 11 } else { t.target_bins[i] }
        );
        assert_eq!(
            t.input_values[i],
            if t.masked[i] { 0.0 } else { t.target_values[i] }
        );
    }
    assert!(t.genes[1..].windows(2).all(|w| w[0] < w[1]));
    // Same stream, same tokens.
    assert_eq!(
        t,
        tok(17).tokenize(&genes, &vals, None, true, &mut Rng::new(1, &[]))
    );
    // A one-gene cell still gets one masked token.
    let t = tok(17).tokenize(&[3], &[2.0], None, true, &mut Rng::new(1, &[]));
    assert_eq!(t.masked, vec![false, true]);
}

#[test]
fn augmentations_drop_and_perturb() {
    let genes: Vec<u32> = (0..1000).collect();
    let vals = vec![1.0f32; 1000];
    let aug = Augment {
        gene_dropout: 0.5,
        noise_std: 0.1,
        ..Default::default()
    };
    let t = tok(2000).tokenize(&genes, &vals, Some(&aug), false, &mut Rng::new(2, &[]));
    let n = t.genes.len() - 1;
    assert!((400..600).contains(&n), "{n}");
    assert!(t.target_values[1..].iter().any(|&v| v != 1.0));
    assert!(!t.masked.iter().any(|&m| m));
}

/// A random cell of `n` values of kind `kind` (0..7; NaN-free but for kind 6).
/// Asserts two tokenized views are identical, values bit for bit.
fn assert_same(got: &CellTokens, want: &CellTokens, what: &str) {
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(got.genes, want.genes, "{what}: genes");
    assert_eq!(got.masked, want.masked, "{what}: masked");
    assert_eq!(got.target_bins, want.target_bins, "{what}: target bins");
    assert_eq!(got.input_bins, want.input_bins, "{what}: input bins");
    assert_eq!(
        bits(&got.target_values),
        bits(&want.target_values),
        "{what}: target values"
    );
    assert_eq!(
        bits(&got.input_values),
        bits(&want.input_values),
        "{what}: input values"
    );
}

fn random_values(r: &mut Rng, n: usize, kind: u64) -> Vec<f32> {
    let counts = |r: &mut Rng, n: usize| -> Vec<f32> {
        // 1 + geometric(0.4) with a heavy tail, log1p-normalised: many ties.
        let c: Vec<f64> = (0..n)
            .map(|_| {
                if r.uniform() < 0.9 {
                    1.0 + ((1.0 - r.uniform()).ln() / 0.6f64.ln()).floor()
                } else {
                    (2.0 + 1.5 * r.normal()).exp().ceil()
                }
            })
            .collect();
        let total: f64 = c.iter().sum();
        c.iter().map(|x| (x / total * 1e4).ln_1p() as f32).collect()
    };
    match kind {
        0 => counts(r, n),
        1 => (0..n).map(|_| r.uniform() as f32 * 10.0).collect(),
        // Few distinct values: heavy ties, including zeros of both signs.
        2 => (0..n)
            .map(|_| [0.0, -0.0, 1.0, 2.5, 2.5, 7.0][r.below(6) as usize])
            .collect(),
        // All equal.
        3 => vec![1.5; n],
        // Counts after noise (as tokenize adds it), so near-distinct values.
        4 => counts(r, n)
            .into_iter()
            .map(|x| (x + 0.1 * r.normal() as f32).max(1e-6))
            .collect(),
        // Any bits, NaNs included (ordered as by total_cmp, like the reference).
        6 => (0..n)
            .map(|_| match r.below(4) {
                0 => f32::from_bits(r.next_u64() as u32),
                1 => f32::NAN,
                _ => [0.0, 1.0, -2.0][r.below(3) as usize],
            })
            .collect(),
        // Anything NaN-free: signs, magnitudes, subnormals, infinities.
        _ => (0..n)
            .map(|_| {
                loop {
                    let x = f32::from_bits(r.next_u64() as u32);
                    if !x.is_nan() {
                        break x;
                    }
                }
            })
            .collect(),
    }
}

#[test]
fn bins_equal_reference_on_random_cells() {
    let mut r = Rng::new(11, &[]);
    let mut sizes = vec![
        1, 2, 3, 4, 5, 7, 31, 32, 33, 34, 50, 63, 64, 65, 100, 511, 512,
    ];
    sizes.extend([1000, 1800, 2000, 2047, 5000, 20_000]);
    sizes.extend((0..200).map(|_| 1 + r.below(3000) as usize));
    let mut cells = 0;
    for &n in &sizes {
        for kind in 0..7 {
            for n_bins in [0, 1, 2, 3, 4, 11, 51, 52, 101, 1000] {
                let v = random_values(&mut r, n, kind);
                assert_eq!(
                    quantile_bins(&v, n_bins),
                    reference_bins(&v, n_bins),
                    "n {n} kind {kind} n_bins {n_bins}"
                );
                cells += 1;
            }
        }
    }
    assert!(cells > 10_000);
}

#[test]
fn order_key_and_rank_select_order_like_total_cmp() {
    let mut r = Rng::new(12, &[]);
    let mut xs: Vec<f32> = (0..10_000)
        .map(|_| f32::from_bits(r.next_u64() as u32))
        .collect();
    xs.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
    ]);
    for w in xs.windows(2) {
        let (a, b) = (w[0], w[1]);
        assert_eq!(order_key(a).cmp(&order_key(b)), a.total_cmp(&b), "{a} {b}");
        assert_eq!(from_order_key(order_key(a)).to_bits(), a.to_bits());
    }
    // Every rank, in a scrambled order, against a sort.
    let mut sorted = xs.clone();
    sorted.sort_by(f32::total_cmp);
    let mut ranks = RankSelect::default();
    ranks.load(&xs);
    for r in (0..xs.len()).map(|i| (i * 7919) % xs.len()) {
        assert_eq!(
            ranks.at(r, &mut 0).to_bits(),
            sorted[r].to_bits(),
            "rank {r}"
        );
    }
    ranks.load(&xs);
    let mut cursor = 0;
    for (r, x) in sorted.iter().enumerate() {
        assert_eq!(ranks.at(r, &mut cursor).to_bits(), x.to_bits(), "rank {r}");
    }
}

#[test]
fn tokenize_bins_are_over_all_kept_values() {
    let mut r = Rng::new(13, &[]);
    let t = Tokenizer {
        n_bins: 51,
        ..tok(512)
    };
    let wide = Tokenizer {
        n_bins: 51,
        ..tok(100_000)
    };
    for cell in 0..200u64 {
        let n = 1 + r.below(3000) as usize;
        let genes: Vec<u32> = (0..n as u32).collect();
        let vals = random_values(&mut r, n, cell % 5);
        // Clean view, sub-sampled: each token's bin is its bin among all the values.
        let all = reference_bins(&vals, 51);
        let x = t.tokenize(&genes, &vals, None, true, &mut Rng::new(1, &[cell]));
        assert_eq!(x.genes.len(), n.min(511) + 1);
        for i in 1..x.genes.len() {
            let g = (x.genes[i] - special::OFFSET) as usize;
            assert_eq!(x.target_bins[i], all[g]);
            assert_eq!(x.target_values[i].to_bits(), vals[g].to_bits());
        }
        // Dropout and noise, no sub-sampling: the tokens are the kept genes, binned
        // over themselves.
        for aug in [
            Augment::default(),
            Augment {
                gene_dropout: 0.3,
                noise_std: 0.1,
                ..Default::default()
            },
        ] {
            let x = wide.tokenize(&genes, &vals, Some(&aug), true, &mut Rng::new(2, &[cell]));
            assert!(x.genes.len() >= 2);
            assert!(x.genes[1..].windows(2).all(|w| w[0] < w[1]));
            assert_eq!(
                reference_bins(&x.target_values[1..], 51),
                x.target_bins[1..]
            );
        }
    }
}

#[test]
fn tokenize_does_not_depend_on_earlier_calls() {
    // The per-thread buffers are reused: every view must equal one tokenized with
    // fresh buffers, whatever came before (sizes, dropout, noise, masking).
    let mut r = Rng::new(15, &[]);
    let t = Tokenizer {
        n_bins: 51,
        ..tok(64)
    };
    let augs = [
        None,
        Some(Augment::default()),
        Some(Augment {
            gene_dropout: 0.0,
            noise_std: 0.2,
            ..Default::default()
        }),
        Some(Augment {
            gene_dropout: 0.5,
            noise_std: 0.1,
            ..Default::default()
        }),
    ];
    for cell in 0..300u64 {
        let n = [0, 1, 2, 40, 63, 64, 65, 300, 3000][r.below(9) as usize];
        let genes: Vec<u32> = (0..n as u32).map(|i| 5 * i + 1).collect();
        let vals = random_values(&mut r, n, cell % 6);
        let aug = augs[r.below(4) as usize].as_ref();
        let mask = r.below(2) == 1;
        let reused = t.tokenize(&genes, &vals, aug, mask, &mut Rng::new(6, &[cell]));
        let fresh = t.tokenize_with(
            &genes,
            &vals,
            aug,
            mask,
            &mut Rng::new(6, &[cell]),
            &mut Scratch::default(),
        );
        assert_same(&reused, &fresh, &format!("cell {cell}"));
        assert!(reused.genes.len() <= 64);
    }
}

#[test]
fn tokenize_is_deterministic_across_threads_and_pinned() {
    // Skewed integer counts; sqrt is correctly rounded, so the input is the same on
    // every platform.
    let mut r = Rng::new(14, &[]);
    let genes: Vec<u32> = (0..2000).map(|i| 3 * i).collect();
    let vals: Vec<f32> = (0..2000)
        .map(|_| ((1 + r.below(4) * r.below(4) * r.below(8)) as f32).sqrt())
        .collect();
    let t = Tokenizer {
        n_bins: 51,
        mask_ratio: 0.15,
        ..tok(512)
    };
    // The pinned stream's settings, independent of later changes to the defaults.
    let aug = Augment {
        gene_dropout: 0.1,
        ..Augment::default()
    };
    let views = |t: &Tokenizer| -> Vec<CellTokens> {
        (0..8u64)
            .map(|v| t.tokenize(&genes, &vals, Some(&aug), true, &mut Rng::new(7, &[v])))
            .collect()
    };
    let here = views(&t);
    let there = std::thread::scope(|s| s.spawn(|| views(&t)).join().unwrap());
    assert_eq!(here, there);
    assert_eq!(here, views(&t));
    // Pins the stream (integer and IEEE-exact arithmetic only, no noise), so a change
    // of the random streams is deliberate: the hash of main's tokenizer (the reference).
    let hash = |views: &[CellTokens]| {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for x in views {
            for i in 0..x.genes.len() {
                for w in [
                    x.genes[i] as u64,
                    x.input_bins[i] as u64,
                    x.target_bins[i] as u64,
                    x.input_values[i].to_bits() as u64,
                    x.masked[i] as u64,
                ] {
                    h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
        h
    };
    let reference: Vec<CellTokens> = (0..8u64)
        .map(|v| reference_tokenize(&t, &genes, &vals, Some(&aug), true, &mut Rng::new(7, &[v])))
        .collect();
    assert_eq!(hash(&reference), 0x5c71_f9ce_e5c2_c611, "reference stream");
    assert_eq!(hash(&here), 0x5c71_f9ce_e5c2_c611, "stream");
}

#[test]
fn cellmix_merges_sorted_rows() {
    let (g, v) = cellmix((&[1, 3], &[1.0, 1.0]), (&[2, 3], &[2.0, 2.0]), 0.5);
    assert_eq!(g, vec![1, 2, 3]);
    assert_eq!(v, vec![0.5, 1.0, 1.5]);
}

#[test]
fn collate_pads_with_pad_token() {
    let genes: Vec<u32> = (0..5).collect();
    let vals = vec![1.0f32; 5];
    let t = tok(10);
    let a = t.tokenize(&genes, &vals, None, true, &mut Rng::new(1, &[]));
    let b = t.tokenize(&genes[..2], &vals[..2], None, true, &mut Rng::new(1, &[]));
    let batch = Batch::collate(&[a, b]);
    assert_eq!((batch.n, batch.len), (2, 6));
    assert_eq!(&batch.genes[9..12], &[special::PAD; 3]);
    assert!(!batch.masked[9..12].iter().any(|&m| m));
}

/// The augmentations a config can ask for: none, off, the default, dropout only, noise
/// only, both, and dropout of (nearly) every gene.
fn augments() -> Vec<Option<Augment>> {
    let a = |gene_dropout, noise_std| {
        Some(Augment {
            gene_dropout,
            noise_std,
            ..Default::default()
        })
    };
    vec![
        None,
        a(0.0, 0.0),
        Some(Augment::default()),
        a(0.5, 0.0),
        a(0.0, 0.1),
        a(0.2, 0.1),
        a(1.0, 0.0),
        a(0.999, 0.3),
    ]
}

/// Tokenizes with the fast path and with the reference from the same stream; asserts the
/// views are identical and the streams end in the same state.
fn check_against_reference(
    t: &Tokenizer,
    genes: &[u32],
    vals: &[f32],
    aug: Option<&Augment>,
    mask: bool,
    stream: &[u64],
    what: &str,
) {
    let (mut a, mut b) = (Rng::new(31, stream), Rng::new(31, stream));
    let got = t.tokenize(genes, vals, aug, mask, &mut a);
    let want = reference_tokenize(t, genes, vals, aug, mask, &mut b);
    assert_same(&got, &want, what);
    assert_eq!(a, b, "{what}: the streams end in different states");
}

#[test]
fn tokenize_equals_reference_on_random_cells() {
    let mut r = Rng::new(30, &[]);
    let augs = augments();
    let encodings = [ExpressionEncoding::Binned, ExpressionEncoding::Continuous];
    for cell in 0..4000u64 {
        let n = match cell % 8 {
            0 => 0,
            1 => 1,
            2 => 2 + r.below(3) as usize,
            3 => r.below(70) as usize,
            4 => 500 + r.below(30) as usize,
            5 => 1500 + r.below(1000) as usize,
            6 => r.below(5000) as usize,
            _ => 2000,
        };
        let genes: Vec<u32> = r
            .sample_sorted(20_000, n)
            .into_iter()
            .map(|g| g as u32)
            .collect();
        let kind = r.below(7);
        let vals = random_values(&mut r, n, kind);
        let t = Tokenizer {
            max_seq_len: [2, 3, 17, 64, 512, 513, 10_000][r.below(7) as usize],
            expression: encodings[r.below(2) as usize],
            n_bins: [0, 1, 2, 3, 4, 11, 51, 52, 64, 65, 101][r.below(11) as usize],
            mask_ratio: [0.01, 0.15, 0.5, 0.99][r.below(4) as usize],
            subsample: [Subsample::Random, Subsample::Top][r.below(2) as usize],
        };
        let aug = augs[r.below(augs.len() as u64) as usize].as_ref();
        let mask = r.below(4) != 0;
        let what = format!("cell {cell}: n {n}, {t:?}, {aug:?}, mask {mask}");
        check_against_reference(&t, &genes, &vals, aug, mask, &[cell], &what);
    }
}

#[test]
fn tokenize_equals_reference_on_real_counts() {
    use crate::data::preprocess::normalize_log1p_matrix;
    use crate::data::read::{ReadOptions, read_any};
    let root = crate::testutil::repo_root().join("data");
    let mut x = read_any(&root.join("mouse10k.h5ad"), &ReadOptions::default())
        .unwrap()
        .x;
    normalize_log1p_matrix(&mut x, 1e4);
    let row = |i: usize| {
        let (a, b) = (x.indptr[i] as usize, x.indptr[i + 1] as usize);
        (&x.indices[a..b], &x.data[a..b])
    };
    let mut default = Tokenizer::new(&ModelConfig::preset("default").unwrap());
    let augs = augments();
    for i in 0..x.n_rows.min(3000) {
        let (g, v) = row(i);
        // The default model, and one that sub-samples most cells.
        default.max_seq_len = if i % 2 == 0 { 512 } else { 64 };
        let aug = augs[i % augs.len()].as_ref();
        check_against_reference(&default, g, v, aug, true, &[i as u64], &format!("cell {i}"));
        // A CellMix of this cell and the next, as the loader makes.
        if i % 5 == 0 && i + 1 < x.n_rows {
            let (g, v) = cellmix(row(i), row(i + 1), 0.2);
            check_against_reference(&default, &g, &v, aug, true, &[i as u64, 1], "mix");
        }
    }
}

#[test]
fn dropout_keeps_as_uniform_at_least_p() {
    let genes: Vec<u32> = (0..3000).collect();
    let vals = vec![1.0f32; 3000];
    let (mut kg, mut kv) = (Vec::new(), Vec::new());
    let half_ulp_below_1 = 1.0 - f64::EPSILON / 2.0;
    for p in [
        -0.5,
        1e-300,
        1e-9,
        0.1,
        0.25,
        0.5,
        0.7,
        half_ulp_below_1,
        1.0,
        1.5,
        f64::INFINITY,
    ] {
        let (mut a, mut b) = (Rng::new(40, &[]), Rng::new(40, &[]));
        let w = dropout(&genes, &vals, p, &mut a, &mut kg, &mut kv);
        let want: Vec<u32> = genes.iter().filter(|_| b.uniform() >= p).copied().collect();
        assert_eq!(&kg[..w], &want[..], "p {p}");
        assert_eq!(a, b, "p {p}");
    }
}

#[test]
fn inference_keeps_top_expressed_genes_ties_by_gene_id() {
    let t = tok(4); // room for 3 genes
    let genes = [2u32, 5, 7, 9, 11];
    let values = [1.0f32, 3.0, 2.0, 3.0, 2.0];
    let c = t.tokenize_inference(&genes, &values);
    // Top 3: the two 3.0s (genes 5, 9), then the 2.0 of the lower gene id (7 over 11).
    let off = special::OFFSET;
    assert_eq!(
        c.genes,
        vec![special::CLS, 5 + off, 7 + off, 9 + off],
        "kept genes in gene order"
    );
    assert_eq!(c.input_values, vec![0.0, 3.0, 2.0, 3.0]);
    assert!(c.masked.iter().all(|&m| !m));
    // Bins are over all five expressed values, not only the kept ones.
    let all = quantile_bins(&values, t.n_bins);
    assert_eq!(c.input_bins, vec![0, all[1], all[2], all[3]]);
    assert_eq!(c.input_bins, c.target_bins);
    // A cell that fits keeps everything; the result is a pure function of the cell.
    let small = t.tokenize_inference(&genes[..2], &values[..2]);
    assert_eq!(small.genes.len(), 3);
    assert_eq!(t.tokenize_inference(&genes, &values), c);
}

#[test]
fn top_subsample_keeps_the_top_expressed_genes_of_the_view() {
    let mut r = Rng::new(21, &[]);
    let t = Tokenizer {
        subsample: Subsample::Top,
        ..tok(65)
    };
    for cell in 0..100u64 {
        let n = 65 + r.below(2000) as usize;
        let genes: Vec<u32> = (0..n as u32).map(|g| 2 * g + 1).collect();
        // Few distinct levels: many ties at the cut.
        let vals: Vec<f32> = (0..n).map(|_| (1 + r.below(6)) as f32).collect();
        let x = t.tokenize(&genes, &vals, None, false, &mut Rng::new(3, &[cell]));
        assert_eq!(x.genes.len(), 65, "cell {cell}");
        let kept: Vec<f32> = x.target_values[1..].to_vec();
        let min_kept = kept.iter().copied().fold(f32::INFINITY, f32::min);
        let kept_ids: std::collections::HashSet<i64> = x.genes[1..].iter().copied().collect();
        for (g, v) in genes.iter().zip(&vals) {
            let id = i64::from(*g) + special::OFFSET;
            if *v > min_kept {
                assert!(
                    kept_ids.contains(&id),
                    "cell {cell}: gene {g} ({v}) above the cut was dropped"
                );
            }
            if kept_ids.contains(&id) {
                assert!(*v >= min_kept);
            }
        }
        // Gene order, as a random sub-sample.
        assert!(x.genes[1..].windows(2).all(|w| w[0] < w[1]), "cell {cell}");
        // Reproducible per stream; another stream breaks the ties differently.
        let again = t.tokenize(&genes, &vals, None, false, &mut Rng::new(3, &[cell]));
        assert_eq!(x, again);
    }
    // Ties are not always broken the same way (not by gene index).
    let genes: Vec<u32> = (0..1000).collect();
    let vals = vec![1.0f32; 1000];
    let a = t.tokenize(&genes, &vals, None, false, &mut Rng::new(4, &[0]));
    let b = t.tokenize(&genes, &vals, None, false, &mut Rng::new(4, &[1]));
    assert_ne!(a.genes, b.genes);
    assert_ne!(a.genes[1..], (2..66).collect::<Vec<i64>>()[..]);
}
