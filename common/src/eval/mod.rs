//! Evaluation of cell embeddings (`scfm evaluate`), in pure Rust.
//!
//! The metrics are those of the scIB benchmark (Luecken et al. 2022) and of the usual
//! foundation-model evaluations, each implemented as its reference does (scikit-learn 1.9,
//! scanpy 1.11, scib / scib-metrics 0.5) and cross-checked against it by the tests in
//! `tests/` (which run the references live):
//!
//! - [`classify`]: kNN label transfer (k = 15, majority vote) scored by 5-fold stratified
//!   cross-validation: accuracy and macro-F1 (optionally the mean over several fold
//!   assignments), under cosine distance and, on the same folds, Euclidean distance;
//! - [`kmeans`]: k-means with k = the number of labels → ARI / NMI against the labels;
//! - [`graph`] + [`leiden`]: scanpy's kNN graph (15 neighbours, UMAP connectivities) and
//!   Leiden clustering over scIB's resolution grid, keeping the best NMI → ARI / NMI;
//! - [`silhouette`]: cell-type ASW and, with batches, batch ASW; [`graph::graph_connectivity`];
//! - [`scores`]: ARI, NMI, accuracy, macro-F1; [`knn`]: exact nearest neighbours;
//!   [`distance`]: the blocked pairwise kernel under all of them.
//!
//! Everything is deterministic for a seed (and independent of the number of threads).
//! [`evaluate_embedding`] runs them all.

pub mod classify;
pub mod distance;
pub mod graph;
pub mod kmeans;
pub mod knn;
pub mod leiden;
pub mod scores;
pub mod silhouette;

#[cfg(test)]
mod tests;

use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use classify::{KnnCv, knn_cross_validate, stratified_kfold};
pub use distance::{Embedding, Metric};
pub use graph::{Graph, graph_connectivity, modularity, umap_connectivities};
pub use kmeans::{KMeans, KMeansOptions, kmeans};
pub use knn::{Knn, knn, knn_with};
pub use leiden::{LeidenChoice, LeidenRun, default_resolutions, leiden, leiden_best_nmi};
pub use scores::{accuracy, adjusted_rand_score, macro_f1, normalized_mutual_info_score};
pub use silhouette::{asw_batch, asw_celltype, silhouette_samples, silhouette_score};

use crate::error::{Error, Result};

/// Settings of [`evaluate_embedding_with`]; the defaults are those of the references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalOptions {
    /// Neighbours of the kNN classifier.
    pub knn_k: usize,
    /// Distance of the kNN classifier.
    pub knn_metric: Metric,
    /// Also score the kNN classifier under Euclidean distance, on the same fold
    /// assignments (`knn_euclidean_*` in [`Metrics`]). Cosine neighbours ignore a vector's
    /// length, Euclidean ones (scanpy's neighbours, the graph, k-means) use it; PCA's and
    /// scfm's embeddings carry information in it, and neither metric is the right one for
    /// every embedding, so both are reported.
    pub knn_euclidean: bool,
    /// Cross-validation folds.
    pub n_folds: usize,
    /// Shuffle each class's folds with the seed (scikit-learn's `shuffle=True`); `false`
    /// gives scikit-learn's unshuffled `StratifiedKFold` exactly.
    pub shuffle_folds: bool,
    /// Fold assignments (seeds `seed`, `seed + 1`, …; shuffled folds only) the kNN scores
    /// are the mean of, as scikit-learn's `RepeatedStratifiedKFold`: one assignment's
    /// accuracy moves by a few cells with the draw.
    pub knn_repeats: usize,
    /// `n_neighbors` of the graph, counting the cell itself (scanpy's default 15).
    pub graph_n_neighbors: usize,
    /// Distance of the graph and of the silhouettes (scanpy's and scIB's default: euclidean).
    pub graph_metric: Metric,
    /// Leiden resolutions tried (scIB: 0.1, 0.2, …, 2.0).
    pub resolutions: Vec<f64>,
    /// Leiden iterations (negative: until stable, scanpy's default).
    pub leiden_iterations: i32,
    /// k-means settings (`threads` is overridden by [`EvalOptions::threads`]).
    pub kmeans: KMeansOptions,
    /// Independent k-means runs (seeds `seed`, `seed + 1`, …), each the best of
    /// `kmeans.n_init` restarts; the k-means scores are their mean. With k = the number of
    /// labels, runs whose inertia differs by 1–3% can differ by 0.3 in ARI, so one run is
    /// too noisy to compare embeddings by.
    pub kmeans_runs: usize,
    /// Threads (0: all cores); no result depends on it.
    pub threads: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            knn_k: 15,
            knn_metric: Metric::Cosine,
            knn_euclidean: true,
            n_folds: 5,
            shuffle_folds: true,
            knn_repeats: 1,
            graph_n_neighbors: 15,
            graph_metric: Metric::Euclidean,
            resolutions: default_resolutions(),
            leiden_iterations: -1,
            kmeans: KMeansOptions::default(),
            kmeans_runs: 5,
            threads: 0,
        }
    }
}

/// The metrics of one embedding (all in `[0, 1]` except ARI, which can be slightly negative;
/// higher is better).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Cells evaluated.
    pub n_cells: usize,
    /// Embedding dimensions.
    pub n_dims: usize,
    /// Distinct labels.
    pub n_labels: usize,
    /// Distinct batches, when batches were given.
    pub n_batches: Option<usize>,
    /// kNN classifier: mean over folds of the accuracy.
    pub knn_accuracy: f64,
    /// kNN classifier: mean over folds of the macro-F1.
    pub knn_macro_f1: f64,
    /// The standard deviation of the kNN accuracy across the fold assignments (0 for
    /// one).
    #[serde(default)]
    pub knn_accuracy_sd: f64,
    /// How many fold assignments the kNN scores are the mean of.
    #[serde(default)]
    pub knn_repeats: usize,
    /// The kNN classifier under Euclidean distance, same folds: mean accuracy (with
    /// [`EvalOptions::knn_euclidean`]; the main scores when `knn_metric` is Euclidean).
    #[serde(default)]
    pub knn_euclidean_accuracy: Option<f64>,
    /// The same: mean macro-F1.
    #[serde(default)]
    pub knn_euclidean_macro_f1: Option<f64>,
    /// The same: standard deviation of the accuracy across the fold assignments.
    #[serde(default)]
    pub knn_euclidean_accuracy_sd: Option<f64>,
    /// Leiden at the resolution of best NMI: ARI against the labels.
    pub leiden_ari: f64,
    /// Leiden at the resolution of best NMI: NMI against the labels.
    pub leiden_nmi: f64,
    /// That resolution.
    pub leiden_resolution: f64,
    /// Number of Leiden clusters at that resolution.
    pub leiden_n_clusters: usize,
    /// k-means (k = number of labels): ARI against the labels, mean over
    /// [`EvalOptions::kmeans_runs`] runs.
    pub kmeans_ari: f64,
    /// k-means: NMI against the labels, mean over the runs.
    pub kmeans_nmi: f64,
    /// The lowest and highest ARI of the k-means runs.
    #[serde(default)]
    pub kmeans_ari_range: (f64, f64),
    /// The standard deviation of the k-means runs' ARI (0 for one run); its standard
    /// error is this over the square root of the runs.
    #[serde(default)]
    pub kmeans_ari_sd: f64,
    /// How many k-means runs the k-means scores are the mean of.
    #[serde(default)]
    pub kmeans_runs: usize,
    /// Cell-type ASW, `(silhouette + 1) / 2`.
    pub asw_celltype: f64,
    /// Batch ASW (with batches; `None` also when no label has two or more batches).
    pub asw_batch: Option<f64>,
    /// Graph connectivity (with batches).
    pub graph_connectivity: Option<f64>,
}

/// [`evaluate_embedding_with`] with the default options: `emb` is `n × d` row-major,
/// `labels` one per cell (e.g. cell-type codes), `batches` optional batch codes.
pub fn evaluate_embedding(
    emb: &[f32],
    n: usize,
    d: usize,
    labels: &[u32],
    batches: Option<&[u32]>,
    seed: u64,
) -> Result<Metrics> {
    let emb = Embedding::new(emb, n, d)?;
    evaluate_embedding_with(&emb, labels, batches, seed, &EvalOptions::default())
}

/// kNN scores averaged over [`EvalOptions::knn_repeats`] fold assignments.
#[derive(Clone, Copy)]
struct RepeatedKnn {
    accuracy: f64,
    macro_f1: f64,
    accuracy_sd: f64,
}

/// [`knn_cross_validate`] under `metric` over the fold assignments of seeds `seed`,
/// `seed + 1`, ….
fn knn_repeated(
    emb: &Embedding,
    labels: &[u32],
    seed: u64,
    metric: Metric,
    opts: &EvalOptions,
) -> Result<RepeatedKnn> {
    match opts.knn_repeats {
        0 => return Err(Error::eval("knn_repeats must be at least 1")),
        r if r > 1 && !opts.shuffle_folds => {
            return Err(Error::eval(format!(
                "knn_repeats = {r} with unshuffled folds: every assignment would be the same"
            )));
        }
        _ => {}
    }
    let mut acc = Vec::with_capacity(opts.knn_repeats);
    let mut f1 = 0.0;
    for r in 0..opts.knn_repeats as u64 {
        let folds = stratified_kfold(
            labels,
            opts.n_folds,
            opts.shuffle_folds.then_some(seed.wrapping_add(r)),
        )?;
        let cv = knn_cross_validate(emb, labels, &folds, opts.knn_k, metric, opts.threads)?;
        acc.push(cv.accuracy);
        f1 += cv.macro_f1;
    }
    let m = acc.len() as f64;
    let accuracy = acc.iter().sum::<f64>() / m;
    let accuracy_sd = if acc.len() > 1 {
        (acc.iter().map(|a| (a - accuracy).powi(2)).sum::<f64>() / (m - 1.0)).sqrt()
    } else {
        0.0
    };
    Ok(RepeatedKnn {
        accuracy,
        macro_f1: f1 / m,
        accuracy_sd,
    })
}

/// Computes every metric of [`Metrics`] for `emb` (see the module documentation). Needs at
/// least two labels, fewer labels than cells, and a class with `n_folds` cells or more.
pub fn evaluate_embedding_with(
    emb: &Embedding,
    labels: &[u32],
    batches: Option<&[u32]>,
    seed: u64,
    opts: &EvalOptions,
) -> Result<Metrics> {
    let n = emb.n();
    silhouette::check_lengths(n, labels, batches)?;
    let (_, n_labels) = silhouette::dense_codes(labels);
    let n_batches = batches.map(|b| silhouette::dense_codes(b).1);
    let t = Instant::now();

    let knn = knn_repeated(emb, labels, seed, opts.knn_metric, opts)?;
    let knn_euclid = match (opts.knn_euclidean, opts.knn_metric) {
        (false, _) => None,
        (true, Metric::Euclidean) => Some(knn),
        (true, Metric::Cosine) => Some(knn_repeated(emb, labels, seed, Metric::Euclidean, opts)?),
    };
    tracing::debug!(
        seconds = t.elapsed().as_secs_f64(),
        "evaluate: kNN classifier"
    );

    // One pass for the graph's neighbours and the silhouette sums.
    let k_graph = opts.graph_n_neighbors.saturating_sub(1);
    if k_graph == 0 || k_graph >= n {
        return Err(Error::eval(format!(
            "graph_n_neighbors = {} for {n} cells: need 2..={n}",
            opts.graph_n_neighbors
        )));
    }
    let pass = silhouette::silhouette_pass(
        emb,
        opts.graph_metric,
        labels,
        batches,
        k_graph,
        opts.threads,
    )?;
    let asw_celltype = {
        let s = silhouette::label_silhouettes(&pass)?;
        (s.iter().sum::<f64>() / s.len() as f64 + 1.0) / 2.0
    };
    let asw_batch = silhouette::batch_asw(&pass);
    tracing::debug!(
        seconds = t.elapsed().as_secs_f64(),
        "evaluate: neighbours and silhouettes"
    );

    let graph = umap_connectivities(
        pass.knn.as_ref().expect("k_graph > 0"),
        opts.graph_n_neighbors,
    )?;
    let connectivity = match batches {
        Some(_) => Some(graph_connectivity(&graph, labels)?),
        None => None,
    };
    let leiden = leiden_best_nmi(
        &graph,
        labels,
        &opts.resolutions,
        seed,
        opts.leiden_iterations,
        opts.threads,
    )?;
    tracing::debug!(seconds = t.elapsed().as_secs_f64(), "evaluate: Leiden");

    let km_opts = KMeansOptions {
        threads: opts.threads,
        ..opts.kmeans.clone()
    };
    if opts.kmeans_runs == 0 {
        return Err(Error::eval("kmeans_runs must be at least 1"));
    }
    let mut km_ari = Vec::with_capacity(opts.kmeans_runs);
    let mut km_nmi = 0.0;
    for run in 0..opts.kmeans_runs as u64 {
        let km = kmeans(emb, n_labels, seed.wrapping_add(run), &km_opts)?;
        km_ari.push(adjusted_rand_score(labels, &km.labels));
        km_nmi += normalized_mutual_info_score(labels, &km.labels);
    }
    let runs = km_ari.len() as f64;
    let kmeans_ari_range = km_ari
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &a| {
            (lo.min(a), hi.max(a))
        });
    let km_mean = km_ari.iter().sum::<f64>() / runs;
    let kmeans_ari_sd = if km_ari.len() > 1 {
        (km_ari.iter().map(|a| (a - km_mean).powi(2)).sum::<f64>() / (runs - 1.0)).sqrt()
    } else {
        0.0
    };
    tracing::debug!(seconds = t.elapsed().as_secs_f64(), "evaluate: k-means");

    Ok(Metrics {
        n_cells: n,
        n_dims: emb.d(),
        n_labels,
        n_batches,
        knn_accuracy: knn.accuracy,
        knn_macro_f1: knn.macro_f1,
        knn_accuracy_sd: knn.accuracy_sd,
        knn_repeats: opts.knn_repeats,
        knn_euclidean_accuracy: knn_euclid.as_ref().map(|k| k.accuracy),
        knn_euclidean_macro_f1: knn_euclid.as_ref().map(|k| k.macro_f1),
        knn_euclidean_accuracy_sd: knn_euclid.as_ref().map(|k| k.accuracy_sd),
        leiden_ari: leiden.best.ari,
        leiden_nmi: leiden.best.nmi,
        leiden_resolution: leiden.best.resolution,
        leiden_n_clusters: leiden.best.n_clusters,
        kmeans_ari: km_mean,
        kmeans_nmi: km_nmi / runs,
        kmeans_ari_range,
        kmeans_ari_sd,
        kmeans_runs: km_ari.len(),
        asw_celltype,
        asw_batch,
        graph_connectivity: connectivity,
    })
}
