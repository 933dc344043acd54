//! `scfm embed`, `scfm evaluate` and `scfm export` on a model trained for a few steps on
//! real cells (pbmc68k with its counts recovered, scripts/make_data.py): the embedding
//! file opens in anndata with the input's cells and no NaN, is byte-identical when made
//! twice, equals the embedding through an export; evaluation writes the table with the
//! PCA and random-init baselines; inputs without the model's genes are refused by name.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use scfm_tests::{bin, dataset, run_with_timeout, train_tiny_model};

const LIMIT: Duration = Duration::from_secs(600);

fn worker(args: &[&str]) -> std::process::Output {
    run_with_timeout(Command::new(bin("scfm-worker")).args(args), LIMIT)
}

/// The same commands through the `scfm` front end (it runs `scfm-worker` with the same
/// arguments).
fn scfm(args: &[&str]) -> std::process::Output {
    run_with_timeout(Command::new(bin("scfm")).args(args), LIMIT)
}

fn ok(o: &std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn python() -> String {
    std::env::var("SCFM_PYTHON").unwrap_or_else(|_| {
        scfm_tests::repo_root()
            .join(".venv/bin/python")
            .display()
            .to_string()
    })
}

/// The arguments of an embedding on CPU in batches of 50.
fn embed_args<'a>(model: &'a Path, input: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "embed",
        model.to_str().unwrap(),
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--batch-size",
        "50",
    ]
}

fn embed(model: &Path, input: &Path, out: &Path) {
    ok(&worker(&embed_args(model, input, out)), "embed");
}

#[test]
fn embed_export_and_evaluate_on_real_cells() {
    let dir = tempfile::tempdir().unwrap();
    let run = train_tiny_model(dir.path(), &dataset("pbmc68k_counts.h5ad"), 4);
    let input = dataset("pbmc68k_counts.h5ad");

    // Twice: identical bytes (the second into a folder that does not exist yet).
    let (a, b) = (dir.path().join("a.h5ad"), dir.path().join("new/b.h5ad"));
    embed(&run, &input, &a);
    ok(&scfm(&embed_args(&run, &input, &b)), "scfm embed");
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "the same embedding run twice gave different files"
    );

    // Through an export folder: the same embedding.
    let export = dir.path().join("export");
    ok(
        &scfm(&[
            "export",
            run.to_str().unwrap(),
            "--out",
            export.to_str().unwrap(),
        ]),
        "scfm export",
    );
    for f in ["config.json", "model.safetensors", "vocab.tsv", "README.md"] {
        assert!(export.join(f).is_file(), "export lacks {f}");
    }
    let c = dir.path().join("c.h5ad");
    embed(&export, &input, &c);
    // Both read-outs on request (`--embedding`), whatever the model's own setting.
    let (pooled, metric) = (dir.path().join("p.h5ad"), dir.path().join("m.h5ad"));
    for (out, kind) in [(&pooled, "pooled"), (&metric, "decoder_metric")] {
        let mut args = embed_args(&run, &input, out);
        args.extend(["--embedding", kind]);
        ok(&worker(&args), "embed --embedding");
    }

    // anndata opens them: the input's cells and obs columns, the pooled rows (not
    // normalised), no NaN.
    let check = format!(
        r#"
import anndata as ad, numpy as np, sys
src = ad.read_h5ad({input:?})
a = ad.read_h5ad({a:?}); c = ad.read_h5ad({c:?})
e = a.obsm["X_scfm"]
assert e.shape == (src.n_obs, 32), e.shape
assert list(a.obs_names) == list(src.obs_names)
assert list(a.var_names) == list(src.var_names)
assert (a.obs["bulk_labels"] == src.obs["bulk_labels"]).all()
assert not np.isnan(e).any()
n = np.linalg.norm(e, axis=1)
assert (n > 0).all() and n.std() > 1e-3 * n.mean(), "rows normalised or empty"
assert e.std(0).max() > 1e-4, "all cells embedded alike"
u = a.uns["scfm"]
assert u["normalized"] == "none", dict(u)
assert np.array_equal(e, c.obsm["X_scfm"]), "export and checkpoint embeddings differ"
# The decoder's metric: the pooled rows times S = (W^T W / G)^(w/2) of the per-gene weights
# (w: the model's metric_weight, absent 1), and the model's own setting decides which one
# `embed` writes by default.
import json
from safetensors.numpy import load_file
cfg = json.load(open({export:?} + "/config.json"))["model"]
w = cfg.get("metric_weight", 1.0)
p = ad.read_h5ad({pooled:?}); m = ad.read_h5ad({metric:?})
assert p.uns["scfm"]["embedding"] == "mean", dict(p.uns["scfm"])
name = "mean+decoder_metric" if w == 1.0 else f"mean+decoder_metric({{w}})"
assert m.uns["scfm"]["embedding"] == name, (dict(m.uns["scfm"]), name)
W = load_file({export:?} + "/model.safetensors")["gepc.weight"].astype(np.float64)
lam, V = np.linalg.eigh(W.T @ W / W.shape[0])
S = (V * np.clip(lam, 0, None) ** (w / 2)) @ V.T
got = m.obsm["X_scfm"]
assert np.abs(p.obsm["X_scfm"] @ S - got).max() <= 1e-4 * max(1.0, np.abs(got).max())
own = cfg.get("embedding", "pooled")
want = m if own == "decoder_metric" else p
assert int(u["genes_matched"]) == 765 and u["embedding"] == want.uns["scfm"]["embedding"], dict(u)
assert np.array_equal(e, want.obsm["X_scfm"]), "the default read-out is not the model's setting"
print("ok")
"#,
        input = input.display().to_string(),
        a = a.display().to_string(),
        c = c.display().to_string(),
        pooled = pooled.display().to_string(),
        metric = metric.display().to_string(),
        export = export.display().to_string(),
    );
    let o = run_with_timeout(Command::new(python()).arg("-c").arg(&check), LIMIT);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok"),
        "anndata check failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // Evaluation: the table with both baselines, every metric a number.
    let ev = dir.path().join("eval");
    ok(
        &scfm(&[
            "evaluate",
            run.to_str().unwrap(),
            input.to_str().unwrap(),
            "--label-key",
            "bulk_labels",
            "--out",
            ev.to_str().unwrap(),
            "--device",
            "cpu",
            "--kmeans-runs",
            "3",
            "--knn-repeats",
            "2",
        ]),
        "evaluate",
    );
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ev.join("evaluation.json")).unwrap()).unwrap();
    assert!(
        j["embedding"]
            .as_str()
            .is_some_and(|e| e.starts_with("mean")),
        "the read-out's name: {}",
        j["embedding"]
    );
    let rows = j["rows"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["embedding"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["scfm", "random-init", "pca"]);
    for r in rows {
        for k in [
            "knn_accuracy",
            "knn_macro_f1",
            "knn_euclidean_accuracy",
            "knn_euclidean_macro_f1",
            "leiden_ari",
            "kmeans_ari",
            "asw_celltype",
        ] {
            let v = r["metrics"][k].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && (-1.0..=1.0).contains(&v), "{k} = {v}");
        }
        assert_eq!(r["metrics"]["kmeans_runs"].as_u64(), Some(3), "{r}");
        assert_eq!(r["metrics"]["knn_repeats"].as_u64(), Some(2), "{r}");
        assert!(
            r["metrics"]["knn_accuracy_sd"]
                .as_f64()
                .is_some_and(|s| s >= 0.0)
        );
        assert!(
            r["metrics"]["kmeans_ari_sd"]
                .as_f64()
                .is_some_and(|s| s >= 0.0)
        );
    }
    // On these cells PCA separates the cell types well above chance, by either distance.
    assert!(rows[2]["metrics"]["knn_accuracy"].as_f64().unwrap() > 0.7);
    assert!(
        rows[2]["metrics"]["knn_euclidean_accuracy"]
            .as_f64()
            .unwrap()
            > 0.7
    );
    assert_eq!(j["n_cells"].as_u64(), Some(700));
    assert!(
        j["reconstruction"]["scfm"]["gepc_pearson"]
            .as_f64()
            .is_some()
    );
    let md = std::fs::read_to_string(ev.join("evaluation.md")).unwrap();
    assert!(
        md.contains("| pca |") && md.contains("| random-init |") && md.contains("mean of 3 runs"),
        "{md}"
    );
    assert!(
        md.contains("mean over 2 fold assignments") && md.contains("the accuracy's sd across them"),
        "{md}"
    );
    assert!(
        md.contains("| kNN acc (cosine) |") && md.contains("| kNN acc (euclidean) |"),
        "{md}"
    );
}

#[test]
fn embed_refuses_an_input_without_the_models_genes() {
    let dir = tempfile::tempdir().unwrap();
    let run = train_tiny_model(dir.path(), &dataset("pbmc68k_counts.h5ad"), 4);
    let csv = dir.path().join("other.csv");
    std::fs::write(&csv, "cell,FOO1,FOO2\nc1,1,2\nc2,0,3\n").unwrap();
    let o = worker(&[
        "embed",
        run.to_str().unwrap(),
        csv.to_str().unwrap(),
        "--out",
        dir.path().join("x.h5ad").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "embedding an unrelated input succeeded"
    );
    assert!(
        err.contains("other.csv") && err.contains("none of its 2 genes"),
        "{err}"
    );
    assert!(
        !dir.path().join("x.h5ad").exists(),
        "a partial output was left"
    );
}

/// `scfm presets --genes N` prints the parameter count of the model a worker builds for
/// N genes.
#[test]
fn presets_table_matches_a_built_model() {
    let o = scfm(&["presets", "--genes", "765"]);
    ok(&o, "scfm presets");
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    let minimal: u64 = table
        .lines()
        .find(|l| l.starts_with("minimal"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no minimal row:\n{table}"));
    for name in ["default", "large"] {
        assert!(table.lines().any(|l| l.starts_with(name)), "{table}");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("train.yaml");
    std::fs::write(
        &cfg,
        format!(
            "data:\n  path: {}\nmodel:\n  preset: minimal\ntraining:\n  batch_size: 8\n  max_steps: 1\n  eval_every: 1000\n  threads: 1\n  device: cpu\ncheckpoint:\n  url: {}\n  every_steps: 1000\n",
            dataset("pbmc68k_counts.h5ad").display(),
            dir.path().join("run").display()
        ),
    )
    .unwrap();
    let o = worker(&["train", "--config", cfg.to_str().unwrap()]);
    ok(&o, "train minimal");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(&format!("scfm model: {minimal} parameters (765 genes")),
        "presets says {minimal} for minimal with 765 genes; the worker built:\n{out}"
    );
}
