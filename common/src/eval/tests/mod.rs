//! Tests of the whole evaluation; `reference.rs` compares with scikit-learn, scanpy,
//! leidenalg, igraph and scib-metrics run live by `eval_reference.py`.

mod reference;

use super::*;
use crate::rng::Rng;

/// `k` tight, far apart clusters of `m` cells in `d` dimensions (cells interleaved), with
/// batches alternating within each cluster.
fn clusters(k: usize, m: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<u32>, Vec<u32>) {
    let mut rng = Rng::new(seed, &[]);
    let mut x = Vec::new();
    let (mut labels, mut batches) = (Vec::new(), Vec::new());
    for i in 0..k * m {
        let c = i % k;
        for j in 0..d {
            let centre = if j == c % d {
                100.0 * (1 + c / d) as f64
            } else {
                0.0
            };
            x.push((centre + 0.1 * rng.normal()) as f32);
        }
        labels.push(c as u32 * 3 + 1);
        batches.push((i / k % 2) as u32);
    }
    (x, labels, batches)
}

/// `k · m` cells of standard normal noise in `d` dimensions with `k` labels dealt in
/// turn: labels no embedding separates, so seeded runs disagree.
fn noise(k: usize, m: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = Rng::new(seed, &[]);
    let x = (0..k * m * d).map(|_| rng.normal() as f32).collect();
    (x, (0..k * m).map(|i| (i % k) as u32).collect())
}

/// The k-means scores are the mean over `kmeans_runs` runs seeded `seed`, `seed + 1`, …,
/// the range spans them and the standard deviation is theirs (n − 1 in the denominator, as
/// numpy's `std(ddof=1)`).
#[test]
fn kmeans_scores_are_the_mean_of_the_runs() {
    // Overlapping clusters, so that runs with different seeds disagree.
    let (k, m, d) = (5, 30, 3);
    let (x, labels) = noise(k, m, d, 7);
    let emb = Embedding::new(&x, k * m, d).unwrap();
    let opts = EvalOptions {
        kmeans_runs: 3,
        ..Default::default()
    };
    let met = evaluate_embedding_with(&emb, &labels, None, 11, &opts).unwrap();
    let aris: Vec<f64> = (11..14)
        .map(|s| adjusted_rand_score(&labels, &kmeans(&emb, k, s, &opts.kmeans).unwrap().labels))
        .collect();
    let nmis: Vec<f64> = (11..14)
        .map(|s| {
            normalized_mutual_info_score(&labels, &kmeans(&emb, k, s, &opts.kmeans).unwrap().labels)
        })
        .collect();
    assert!((met.kmeans_ari - aris.iter().sum::<f64>() / 3.0).abs() < 1e-12);
    assert!((met.kmeans_nmi - nmis.iter().sum::<f64>() / 3.0).abs() < 1e-12);
    let lo = aris.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = aris.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(met.kmeans_ari_range, (lo, hi));
    assert!(lo < hi, "the runs differ on this input: {aris:?}");
    let mean = aris.iter().sum::<f64>() / 3.0;
    let sd = (aris.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    assert!((met.kmeans_ari_sd - sd).abs() < 1e-12);
    assert_eq!(met.kmeans_runs, 3);
    let none = EvalOptions {
        kmeans_runs: 0,
        ..Default::default()
    };
    let e = evaluate_embedding_with(&emb, &labels, None, 11, &none).unwrap_err();
    assert!(e.to_string().contains("kmeans_runs"), "{e}");
}

/// The kNN scores are the mean over `knn_repeats` fold assignments seeded `seed`,
/// `seed + 1`, …; one repeat is the single assignment of `seed`.
#[test]
fn knn_scores_are_the_mean_over_fold_assignments() {
    let (k, m, d) = (4, 30, 3);
    let (x, labels) = noise(k, m, d, 5);
    let emb = Embedding::new(&x, k * m, d).unwrap();
    let single = |s: u64| {
        let folds = stratified_kfold(&labels, 5, Some(s)).unwrap();
        knn_cross_validate(&emb, &labels, &folds, 15, Metric::Cosine, 1).unwrap()
    };
    let opts = |r: usize| EvalOptions {
        knn_repeats: r,
        kmeans_runs: 1,
        ..Default::default()
    };
    let one = evaluate_embedding_with(&emb, &labels, None, 21, &opts(1)).unwrap();
    assert_eq!(
        (
            one.knn_accuracy,
            one.knn_macro_f1,
            one.knn_accuracy_sd,
            one.knn_repeats
        ),
        (single(21).accuracy, single(21).macro_f1, 0.0, 1)
    );
    let three = evaluate_embedding_with(&emb, &labels, None, 21, &opts(3)).unwrap();
    let acc: Vec<f64> = (21..24).map(|s| single(s).accuracy).collect();
    let f1: f64 = (21..24).map(|s| single(s).macro_f1).sum::<f64>() / 3.0;
    let mean = acc.iter().sum::<f64>() / 3.0;
    let sd = (acc.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    assert!(sd > 0.0, "the assignments differ on this input: {acc:?}");
    assert!((three.knn_accuracy - mean).abs() < 1e-12);
    assert!((three.knn_macro_f1 - f1).abs() < 1e-12);
    assert!((three.knn_accuracy_sd - sd).abs() < 1e-12);
    assert_eq!(three.knn_repeats, 3);
    let e = evaluate_embedding_with(&emb, &labels, None, 21, &opts(0)).unwrap_err();
    assert!(e.to_string().contains("knn_repeats"), "{e}");
    let fixed = EvalOptions {
        shuffle_folds: false,
        ..opts(2)
    };
    let e = evaluate_embedding_with(&emb, &labels, None, 21, &fixed).unwrap_err();
    assert!(e.to_string().contains("unshuffled"), "{e}");
}

/// The Euclidean kNN scores are those of the Euclidean classifier on the same fold
/// assignments; they see a vector's length, which cosine neighbours do not: two classes at
/// radii 1 and 1.5 on the same narrow fan of directions (angles 0–0.3 rad, so a class
/// spans at most 0.45 and the classes are 0.5 apart) are apart by Euclidean distance only.
#[test]
fn knn_is_also_scored_under_euclidean_distance() {
    let (m, d) = (40, 2);
    let mut rng = Rng::new(7, &[]);
    let mut x = Vec::with_capacity(2 * m * d);
    let mut labels = Vec::with_capacity(2 * m);
    for (class, radius) in [(0u32, 1.0f64), (1, 1.5)] {
        for _ in 0..m {
            let angle = 0.3 * rng.uniform();
            x.extend([(radius * angle.cos()) as f32, (radius * angle.sin()) as f32]);
            labels.push(class);
        }
    }
    let emb = Embedding::new(&x, 2 * m, d).unwrap();
    let opts = EvalOptions {
        knn_repeats: 2,
        kmeans_runs: 1,
        ..Default::default()
    };
    let met = evaluate_embedding_with(&emb, &labels, None, 5, &opts).unwrap();
    let euclid: Vec<KnnCv> = (5..7)
        .map(|s| {
            let folds = stratified_kfold(&labels, 5, Some(s)).unwrap();
            knn_cross_validate(&emb, &labels, &folds, 15, Metric::Euclidean, 1).unwrap()
        })
        .collect();
    let mean = |f: fn(&KnnCv) -> f64| euclid.iter().map(f).sum::<f64>() / 2.0;
    assert_eq!(met.knn_euclidean_accuracy, Some(mean(|c| c.accuracy)));
    assert_eq!(met.knn_euclidean_macro_f1, Some(mean(|c| c.macro_f1)));
    assert!(met.knn_euclidean_accuracy_sd.is_some());
    assert_eq!(met.knn_euclidean_accuracy, Some(1.0));
    assert!(
        met.knn_accuracy < 0.8,
        "cosine sees directions only: {met:?}"
    );

    let off = EvalOptions {
        knn_euclidean: false,
        ..opts.clone()
    };
    let met = evaluate_embedding_with(&emb, &labels, None, 5, &off).unwrap();
    assert_eq!(met.knn_euclidean_accuracy, None);
    assert_eq!(met.knn_euclidean_macro_f1, None);
    let main = EvalOptions {
        knn_metric: Metric::Euclidean,
        ..opts
    };
    let met = evaluate_embedding_with(&emb, &labels, None, 5, &main).unwrap();
    assert_eq!(met.knn_accuracy, 1.0);
    assert_eq!(met.knn_euclidean_accuracy, Some(met.knn_accuracy));
}

#[test]
fn separated_clusters_score_perfectly() {
    let (k, m, d) = (4, 40, 6);
    let (x, labels, batches) = clusters(k, m, d, 1);
    let met = evaluate_embedding(&x, k * m, d, &labels, Some(&batches), 3).unwrap();
    assert_eq!(
        (met.n_cells, met.n_dims, met.n_labels, met.n_batches),
        (160, 6, 4, Some(2))
    );
    assert_eq!(met.knn_accuracy, 1.0);
    assert_eq!(met.knn_macro_f1, 1.0);
    assert_eq!(met.kmeans_ari, 1.0);
    assert_eq!(met.kmeans_nmi, 1.0);
    assert_eq!(met.leiden_ari, 1.0, "{met:?}");
    assert_eq!(met.leiden_nmi, 1.0);
    assert_eq!(met.leiden_n_clusters, 4);
    assert_eq!(met.graph_connectivity, Some(1.0));
    assert!(met.asw_celltype > 0.99, "{}", met.asw_celltype);
    // Batches are random within the tight clusters: well mixed.
    assert!(met.asw_batch.unwrap() > 0.9, "{:?}", met.asw_batch);
    let again = evaluate_embedding(&x, k * m, d, &labels, Some(&batches), 3).unwrap();
    assert_eq!(met, again, "deterministic");
    let single = EvalOptions {
        threads: 1,
        ..Default::default()
    };
    let emb = Embedding::new(&x, k * m, d).unwrap();
    let one = evaluate_embedding_with(&emb, &labels, Some(&batches), 3, &single).unwrap();
    assert_eq!(met, one, "independent of the number of threads");
    let json = serde_json::to_value(&met).unwrap();
    assert_eq!(json["knn_accuracy"], 1.0);
    let no_batch = evaluate_embedding(&x, k * m, d, &labels, None, 3).unwrap();
    assert_eq!(
        (no_batch.asw_batch, no_batch.graph_connectivity),
        (None, None)
    );
}

#[test]
fn bad_inputs_are_named() {
    let (x, labels, batches) = clusters(2, 10, 3, 2);
    let e = evaluate_embedding(&x, 20, 3, &labels[..19], None, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("19 labels for 20 cells"), "{e}");
    let e = evaluate_embedding(&x, 20, 3, &labels, Some(&batches[..3]), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 batch labels for 20 cells"), "{e}");
    let e = evaluate_embedding(&x, 21, 3, &labels, None, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("60 values") && e.contains("21 cells"), "{e}");
    let e = evaluate_embedding(&x, 20, 3, &[5; 20], None, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 labels for 20 cells"), "{e}");
}

/// CPU seconds used by this process so far (user + system, from `/proc/self/stat`; 0 where
/// unavailable): on a shared machine wall-clock times mislead.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    // After the command name: state is field 3; utime and stime are fields 14 and 15.
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// Timing on 10 000 cells × 128 dims (run with `--ignored --nocapture`): wall-clock and CPU
/// seconds of each part.
#[test]
#[ignore]
fn timing_10k_by_128() {
    let (n, d, k) = (10_000, 128, 12);
    let mut rng = Rng::new(4, &[]);
    let centers: Vec<f64> = (0..k * d).map(|_| rng.normal() * 0.5).collect();
    let labels: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
    let batches: Vec<u32> = (0..n).map(|_| rng.below(4) as u32).collect();
    let x: Vec<f32> = (0..n * d)
        .map(|i| (centers[labels[i / d] as usize * d + i % d] + rng.normal()) as f32)
        .collect();
    let emb = Embedding::new(&x, n, d).unwrap();
    let time = |what: &str, f: &mut dyn FnMut()| {
        let (t, c) = (std::time::Instant::now(), cpu_seconds());
        f();
        eprintln!(
            "{what}: {:.2} s wall, {:.2} s CPU",
            t.elapsed().as_secs_f64(),
            cpu_seconds() - c
        );
    };
    time("knn k=15 cosine", &mut || {
        knn(&emb, 15, Metric::Cosine).unwrap();
    });
    let folds = stratified_kfold(&labels, 5, Some(1)).unwrap();
    time("kNN classifier (5 folds, one pass)", &mut || {
        knn_cross_validate(&emb, &labels, &folds, 15, Metric::Cosine, 0).unwrap();
    });
    time("silhouettes + batch ASW + 14-NN (one pass)", &mut || {
        silhouette::silhouette_pass(&emb, Metric::Euclidean, &labels, Some(&batches), 14, 0)
            .unwrap();
    });
    let nn = knn(&emb, 14, Metric::Euclidean).unwrap();
    let g = umap_connectivities(&nn, 15).unwrap();
    time("Leiden, 20 resolutions", &mut || {
        leiden_best_nmi(&g, &labels, &default_resolutions(), 0, -1, 0).unwrap();
    });
    time("k-means (n_init 10)", &mut || {
        kmeans(&emb, k, 0, &KMeansOptions::default()).unwrap();
    });
    let mut m = None;
    time("evaluate_embedding", &mut || {
        m = Some(evaluate_embedding(&x, n, d, &labels, Some(&batches), 0).unwrap());
    });
    eprintln!("{}", serde_json::to_string_pretty(&m).unwrap());
}
