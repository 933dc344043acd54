//! Cross-checks against the references, run live by `eval_reference.py` with `$SCFM_PYTHON`
//! on the same inputs and on our results: scikit-learn (folds, kNN classifier, accuracy,
//! F1, neighbours, silhouettes, ARI, NMI, k-means), scanpy (`pp.neighbors` connectivities,
//! `tl.leiden` with leidenalg), igraph (modularity) and, when installed, scib-metrics.
//!
//! Cases: seeded Gaussian blobs with label noise and batch shifts, and the PCA of
//! `data/pbmc68k_reduced.h5ad` (`obsm['X_pca']`, labels `bulk_labels`, batches `phase`).
//! Every check runs and all mismatches are reported together; the observed errors are printed.

use std::path::Path;

use serde_json::Value;

use super::super::silhouette::silhouette_pass;
use super::super::*;
use crate::rng::Rng;
use crate::testutil::{python, read_bin, repo_root};

const SEED: u64 = 20_24;
const SCRIPT: &str = "common/src/eval/tests/eval_reference.py";

fn run(args: &[&str]) {
    let py = python();
    let out = std::process::Command::new(&py)
        .arg(repo_root().join(SCRIPT))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py} (SCFM_PYTHON): {e}"));
    assert!(
        out.status.success(),
        "{SCRIPT} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_i64(dir: &Path, name: &str, v: impl IntoIterator<Item = i64>) {
    let bytes: Vec<u8> = v.into_iter().flat_map(i64::to_le_bytes).collect();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn write_f64(dir: &Path, name: &str, v: &[f64]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn write_u32s(dir: &Path, name: &str, v: &[u32]) {
    write_i64(dir, name, v.iter().map(|&x| x as i64));
}

fn i64s(dir: &Path, name: &str) -> Vec<i64> {
    read_bin(&dir.join(name), i64::from_le_bytes)
}

fn f64s(dir: &Path, name: &str) -> Vec<f64> {
    read_bin(&dir.join(name), f64::from_le_bytes)
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("ref.json: {path:?} is not a number: {x}"))
}

/// Collects mismatches; prints every measured error.
#[derive(Default)]
struct Report(Vec<String>);

impl Report {
    fn check(&mut self, ok: bool, what: String) {
        eprintln!("{} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.0.push(what);
        }
    }

    /// `|got - want| <= tol * max(1, |want|)` element-wise.
    fn close(&mut self, what: &str, got: &[f64], want: &[f64], tol: f64) {
        if got.len() != want.len() {
            return self.check(
                false,
                format!("{what}: {} values vs {}", got.len(), want.len()),
            );
        }
        let err = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
            .fold(0.0, f64::max);
        self.check(
            err <= tol,
            format!("{what}: largest error {err:.2e} (tolerance {tol:e})"),
        );
    }

    fn same<T: PartialEq>(&mut self, what: &str, got: &[T], want: &[T]) {
        let diff = if got.len() == want.len() {
            got.iter().zip(want).filter(|(a, b)| a != b).count()
        } else {
            usize::MAX
        };
        self.check(
            diff == 0,
            format!("{what}: {diff} of {} differ", want.len()),
        );
    }

    fn finish(self, case: &str) {
        assert!(
            self.0.is_empty(),
            "{case}: {} mismatches:\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

/// A CSR matrix written by the script.
fn csr(dir: &Path, prefix: &str) -> (Vec<i64>, Vec<i64>, Vec<f64>) {
    (
        i64s(dir, &format!("{prefix}_indptr.i64")),
        i64s(dir, &format!("{prefix}_indices.i64")),
        f64s(dir, &format!("{prefix}_data.f64")),
    )
}

fn compare_graph(
    rep: &mut Report,
    what: &str,
    g: &Graph,
    want: (Vec<i64>, Vec<i64>, Vec<f64>),
    tol: f64,
) {
    let indptr: Vec<i64> = g.indptr.iter().map(|&v| v as i64).collect();
    let indices: Vec<i64> = g.indices.iter().map(|&v| v as i64).collect();
    rep.same(&format!("{what}: row pointers"), &indptr, &want.0);
    rep.same(&format!("{what}: columns"), &indices, &want.1);
    if indices == want.1 {
        rep.close(&format!("{what}: weights"), &g.weights, &want.2, tol);
    }
}

/// Runs everything on one case and compares with the references.
#[allow(clippy::too_many_arguments)]
fn cross_check(
    case: &str,
    dir: &Path,
    x: &[f32],
    n: usize,
    d: usize,
    labels: &[u32],
    batches: &[u32],
    separable: bool,
) {
    let emb = Embedding::new(x, n, d).unwrap();
    let mut rep = Report::default();
    let (k_nn, n_neighbors) = (15, 15);
    let resolutions = [0.5, 1.0];

    // Our results.
    let folds_plain = stratified_kfold(labels, 5, None).unwrap();
    let folds_shuf = stratified_kfold(labels, 5, Some(SEED)).unwrap();
    let cv_plain = knn_cross_validate(&emb, labels, &folds_plain, k_nn, Metric::Cosine, 0).unwrap();
    let cv_shuf = knn_cross_validate(&emb, labels, &folds_shuf, k_nn, Metric::Cosine, 0).unwrap();
    let cv_euclid =
        knn_cross_validate(&emb, labels, &folds_shuf, k_nn, Metric::Euclidean, 0).unwrap();
    let pass = silhouette_pass(
        &emb,
        Metric::Euclidean,
        labels,
        Some(batches),
        n_neighbors - 1,
        0,
    )
    .unwrap();
    let nn = pass.knn.clone().unwrap();
    let conn = umap_connectivities(&nn, n_neighbors).unwrap();
    let sil_euc = silhouette_samples(&emb, labels, Metric::Euclidean, 0).unwrap();
    let sil_cos = silhouette_samples(&emb, labels, Metric::Cosine, 0).unwrap();
    let asw_b = asw_batch(&emb, labels, batches, Metric::Euclidean, 0)
        .unwrap()
        .unwrap();
    let gc = graph_connectivity(&conn, labels).unwrap();
    let n_labels = {
        let mut u = labels.to_vec();
        u.sort();
        u.dedup();
        u.len()
    };
    let km = kmeans(&emb, n_labels, SEED, &KMeansOptions::default()).unwrap();
    let leidens: Vec<Vec<u32>> = resolutions
        .iter()
        .map(|&r| leiden(&conn, r, SEED, -1))
        .collect();
    let best = leiden_best_nmi(&conn, labels, &default_resolutions(), SEED, -1, 0).unwrap();
    let mut rng = Rng::new(SEED, &[1]);
    let random: Vec<u32> = (0..n).map(|_| rng.below(7) as u32).collect();

    // Inputs and results for the script.
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join("x.f32"), bytes).unwrap();
    write_u32s(dir, "labels.i64", labels);
    write_u32s(dir, "batches.i64", batches);
    write_u32s(dir, "folds_plain.i64", &folds_plain);
    write_u32s(dir, "folds_shuf.i64", &folds_shuf);
    write_u32s(dir, "knn_idx.i64", &nn.indices);
    write_f64(dir, "knn_dist.f64", &nn.distances);
    write_i64(
        dir,
        "conn_indptr.i64",
        conn.indptr.iter().map(|&v| v as i64),
    );
    write_u32s(dir, "conn_indices.i64", &conn.indices);
    write_f64(dir, "conn_data.f64", &conn.weights);
    write_u32s(dir, "kmeans.i64", &km.labels);
    for (r, m) in resolutions.iter().zip(&leidens) {
        write_u32s(dir, &format!("leiden_{r:?}.i64"), m);
    }
    write_u32s(dir, "leiden_best.i64", &best.membership);
    write_u32s(dir, "random.i64", &random);
    let partitions: [(&str, &[u32]); 6] = [
        ("labels", labels),
        ("batches", batches),
        ("kmeans", &km.labels),
        ("leiden_1.0", &leidens[1]),
        ("leiden_best", &best.membership),
        ("random", &random),
    ];
    let pairs: Vec<(usize, usize)> = (0..partitions.len())
        .flat_map(|a| (a + 1..partitions.len()).map(move |b| (a, b)))
        .collect();
    let names: Vec<&str> = partitions.iter().map(|p| p.0).collect();
    let pair_names: Vec<(&str, &str)> = pairs.iter().map(|&(a, b)| (names[a], names[b])).collect();
    std::fs::write(
        dir.join("pairs.json"),
        serde_json::to_string(&pair_names).unwrap(),
    )
    .unwrap();
    let spec = serde_json::json!({
        "n": n, "d": d, "knn_k": k_nn, "graph_n_neighbors": n_neighbors,
        "resolutions": resolutions, "partitions": names,
    });
    std::fs::write(dir.join("spec.json"), spec.to_string()).unwrap();

    run(&["check", dir.to_str().unwrap()]);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref.json")).unwrap()).unwrap();
    eprintln!("== {case}: {n} cells × {d} dims, {n_labels} labels");

    // Folds and the kNN classifier.
    let ref_folds: Vec<u32> = i64s(dir, "ref_folds_plain.i64")
        .iter()
        .map(|&v| v as u32)
        .collect();
    rep.same("StratifiedKFold(5) folds", &folds_plain, &ref_folds);
    for (name, cv) in [
        ("plain", &cv_plain),
        ("shuf", &cv_shuf),
        ("euclid", &cv_euclid),
    ] {
        let pred: Vec<u32> = i64s(dir, &format!("ref_pred_{name}.i64"))
            .iter()
            .map(|&v| v as u32)
            .collect();
        rep.same(
            &format!("kNN predictions ({name} folds)"),
            &cv.predictions,
            &pred,
        );
        let fa: Vec<f64> = r[format!("knn_fold_accuracy_{name}")]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let ff: Vec<f64> = r[format!("knn_fold_macro_f1_{name}")]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        rep.close(
            &format!("kNN fold accuracies ({name})"),
            &cv.fold_accuracy,
            &fa,
            1e-12,
        );
        rep.close(
            &format!("kNN fold macro-F1 ({name})"),
            &cv.fold_macro_f1,
            &ff,
            1e-12,
        );
        rep.close(
            &format!("kNN accuracy ({name})"),
            &[cv.accuracy],
            &[num(&r, &[&format!("knn_accuracy_{name}")])],
            1e-12,
        );
        rep.close(
            &format!("kNN macro-F1 ({name})"),
            &[cv.macro_f1],
            &[num(&r, &[&format!("knn_macro_f1_{name}")])],
            1e-12,
        );
        eprintln!(
            "     kNN ({name} folds): accuracy {:.4}, macro-F1 {:.4}",
            cv.accuracy, cv.macro_f1
        );
    }

    // Neighbours and connectivities.
    let ref_idx: Vec<u32> = i64s(dir, "ref_knn_idx.i64")
        .iter()
        .map(|&v| v as u32)
        .collect();
    rep.same("euclidean 14-NN indices", &nn.indices, &ref_idx);
    rep.close(
        "euclidean 14-NN distances",
        &nn.distances,
        &f64s(dir, "ref_knn_dist.f64"),
        1e-9,
    );
    compare_graph(
        &mut rep,
        "connectivities vs umap() on our kNN",
        &conn,
        csr(dir, "ref_conn_mine"),
        0.0,
    );
    compare_graph(
        &mut rep,
        "connectivities vs sc.pp.neighbors",
        &conn,
        csr(dir, "ref_conn_scanpy"),
        1e-5,
    );

    // Silhouettes and scIB scores.
    rep.close(
        "silhouette_samples euclidean",
        &sil_euc,
        &f64s(dir, "ref_sil_euclidean.f64"),
        1e-9,
    );
    rep.close(
        "silhouette_samples cosine",
        &sil_cos,
        &f64s(dir, "ref_sil_cosine.f64"),
        1e-9,
    );
    let asw_c = asw_celltype(&emb, labels, Metric::Euclidean, 0).unwrap();
    let ref_sil = f64s(dir, "ref_sil_euclidean.f64");
    let ref_asw_c = (ref_sil.iter().sum::<f64>() / n as f64 + 1.0) / 2.0;
    rep.close("cell-type ASW", &[asw_c], &[ref_asw_c], 1e-9);
    rep.close("batch ASW", &[asw_b], &[num(&r, &["asw_batch"])], 1e-9);
    rep.close(
        "graph connectivity (our graph)",
        &[gc],
        &[num(&r, &["graph_connectivity_mine"])],
        1e-12,
    );
    rep.close(
        "graph connectivity (scanpy's graph)",
        &[gc],
        &[num(&r, &["graph_connectivity_scanpy"])],
        1e-12,
    );
    if r.get("scib_asw_label").is_some() {
        rep.close(
            "scib-metrics silhouette_label (float32)",
            &[asw_c],
            &[num(&r, &["scib_asw_label"])],
            1e-5,
        );
        rep.close(
            "scib-metrics silhouette_batch (float32)",
            &[asw_b],
            &[num(&r, &["scib_asw_batch"])],
            1e-5,
        );
        eprintln!(
            "     scib-metrics graph_connectivity (directed kNN graph, strong components): {:.4}; scIB's on the connectivities: {gc:.4}",
            num(&r, &["scib_graph_connectivity_directed_knn"])
        );
    } else {
        eprintln!("     scib-metrics not installed: compared with scikit-learn restatements only");
    }

    // ARI / NMI.
    let ari: Vec<f64> = pairs
        .iter()
        .map(|&(a, b)| adjusted_rand_score(partitions[a].1, partitions[b].1))
        .collect();
    let nmi: Vec<f64> = pairs
        .iter()
        .map(|&(a, b)| normalized_mutual_info_score(partitions[a].1, partitions[b].1))
        .collect();
    let arr = |k: &str| -> Vec<f64> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    rep.close("adjusted_rand_score (15 pairs)", &ari, &arr("ari"), 1e-9);
    rep.close(
        "normalized_mutual_info_score (15 pairs)",
        &nmi,
        &arr("nmi"),
        1e-9,
    );

    // k-means.
    let sk_inertia = num(&r, &["sk_kmeans_inertia"]);
    let vs = num(&r, &["kmeans_ari_vs_sklearn"]);
    eprintln!(
        "     k-means: inertia {:.6e} (scikit-learn {sk_inertia:.6e}, ratio {:.5}); ARI vs scikit-learn's labels {vs:.4}; ARI vs labels {:.4} (scikit-learn {:.4})",
        km.inertia,
        km.inertia / sk_inertia,
        adjusted_rand_score(labels, &km.labels),
        num(&r, &["sk_kmeans_ari"])
    );
    if separable {
        rep.check(
            vs >= 0.99,
            format!("k-means ARI vs scikit-learn's KMeans {vs:.4} >= 0.99"),
        );
    }
    rep.check(
        km.inertia <= sk_inertia * 1.01,
        format!(
            "k-means inertia within 1% of scikit-learn's (ratio {:.5})",
            km.inertia / sk_inertia
        ),
    );

    // Leiden.
    for (res, m) in resolutions.iter().zip(&leidens) {
        let key = format!("{res:?}");
        let q_ours = modularity(&conn, m, *res);
        let q_ig = num(&r, &["leiden", &key, "modularity_mine"]);
        let q_sc = num(&r, &["leiden", &key, "modularity_scanpy"]);
        let ari_ours = adjusted_rand_score(labels, m);
        let ari_sc = num(&r, &["leiden", &key, "ari_scanpy"]);
        let k_ours = m.iter().max().unwrap() + 1;
        eprintln!(
            "     Leiden γ={res}: modularity {q_ours:.5} (scanpy/leidenalg {q_sc:.5}), ARI vs labels {ari_ours:.4} (scanpy {ari_sc:.4}), clusters {k_ours} (scanpy {})",
            num(&r, &["leiden", &key, "n_clusters_scanpy"])
        );
        rep.close(
            &format!("modularity γ={res} vs igraph"),
            &[q_ours],
            &[q_ig],
            1e-9,
        );
        rep.check(
            q_ours >= q_sc - 0.01,
            format!("Leiden γ={res}: modularity {q_ours:.5} >= leidenalg's {q_sc:.5} - 0.01"),
        );
        rep.check(
            (ari_ours - ari_sc).abs() <= 0.05,
            format!("Leiden γ={res}: ARI {ari_ours:.4} within 0.05 of scanpy's {ari_sc:.4}"),
        );
    }
    let sb = &r["scib_leiden_best"];
    eprintln!(
        "     best-NMI Leiden: resolution {} NMI {:.4} ARI {:.4} (scanpy + scIB grid: resolution {} NMI {:.4} ARI {:.4})",
        best.best.resolution,
        best.best.nmi,
        best.best.ari,
        num(sb, &["resolution"]),
        num(sb, &["nmi"]),
        num(sb, &["ari"])
    );
    rep.check(
        (best.best.nmi - num(sb, &["nmi"])).abs() <= 0.05,
        "best-NMI Leiden NMI within 0.05 of scanpy + scIB's".into(),
    );

    // The entry point gives the same numbers as the parts.
    let opts = EvalOptions {
        shuffle_folds: true,
        kmeans_runs: 1,
        ..Default::default()
    };
    let m = evaluate_embedding_with(&emb, labels, Some(batches), SEED, &opts).unwrap();
    let parts = [
        (m.knn_accuracy, cv_shuf.accuracy),
        (m.knn_macro_f1, cv_shuf.macro_f1),
        (m.asw_celltype, asw_c),
        (m.asw_batch.unwrap(), asw_b),
        (m.graph_connectivity.unwrap(), gc),
        (m.leiden_nmi, best.best.nmi),
        (m.leiden_ari, best.best.ari),
        (m.kmeans_ari, adjusted_rand_score(labels, &km.labels)),
    ];
    rep.check(
        parts.iter().all(|(a, b)| a == b),
        format!("evaluate_embedding agrees with its parts: {parts:?}"),
    );
    eprintln!("     {}", serde_json::to_string(&m).unwrap());
    rep.finish(case);
}

/// Gaussian blobs: 8 classes of unequal sizes in 32 dimensions, 3% of labels flipped, three
/// batches each shifting its cells.
fn blobs() -> (Vec<f32>, usize, usize, Vec<u32>, Vec<u32>) {
    let (n, d, k, nb) = (1500usize, 32usize, 8usize, 3usize);
    let mut rng = Rng::new(SEED, &[7]);
    let centers: Vec<f64> = (0..k * d).map(|_| rng.normal() * 0.9).collect();
    let shifts: Vec<f64> = (0..nb * d).map(|_| rng.normal() * 0.25).collect();
    let weights: Vec<usize> = (1..=k).collect();
    let total: usize = weights.iter().sum();
    let mut x = Vec::with_capacity(n * d);
    let (mut labels, mut batches) = (Vec::new(), Vec::new());
    for i in 0..n {
        // class by cumulative weight of i
        let mut t = i * total / n;
        let mut c = 0;
        while t >= weights[c] {
            t -= weights[c];
            c += 1;
        }
        let b = rng.below(nb as u64) as usize;
        for j in 0..d {
            x.push((centers[c * d + j] + shifts[b * d + j] + rng.normal()) as f32);
        }
        let noisy = if rng.uniform() < 0.03 {
            rng.below(k as u64) as usize
        } else {
            c
        };
        labels.push(noisy as u32);
        batches.push(b as u32);
    }
    (x, n, d, labels, batches)
}

#[test]
fn blobs_match_the_references() {
    let dir = tempfile::tempdir().unwrap();
    let (x, n, d, labels, batches) = blobs();
    cross_check("blobs", dir.path(), &x, n, d, &labels, &batches, true);
}

#[test]
fn pbmc68k_pca_matches_the_references() {
    let dir = tempfile::tempdir().unwrap();
    let data = repo_root().join("data/pbmc68k_reduced.h5ad");
    run(&[
        "export",
        data.to_str().unwrap(),
        dir.path().to_str().unwrap(),
    ]);
    let shape: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("shape.json")).unwrap())
            .unwrap();
    let (n, d) = (
        shape["n"].as_u64().unwrap() as usize,
        shape["d"].as_u64().unwrap() as usize,
    );
    let x: Vec<f32> = read_bin(&dir.path().join("x.f32"), f32::from_le_bytes);
    let labels: Vec<u32> = i64s(dir.path(), "labels.i64")
        .iter()
        .map(|&v| v as u32)
        .collect();
    let batches: Vec<u32> = i64s(dir.path(), "batches.i64")
        .iter()
        .map(|&v| v as u32)
        .collect();
    cross_check(
        "pbmc68k_reduced X_pca",
        dir.path(),
        &x,
        n,
        d,
        &labels,
        &batches,
        false,
    );
}
