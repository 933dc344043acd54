//! `scfm evaluate MODEL DATA --label-key KEY [--batch-key KEY]`: the trained model's cell
//! embedding next to, on the same cells in the same run, the PCA baseline (scanpy's
//! recipe) and the randomly initialised model of the same architecture, scored by the
//! same metrics (kNN label transfer, Leiden and k-means clustering agreement, silhouette,
//! and with batches batch mixing); plus the model's own reconstruction scores.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use scfm_common::config::{CellEmbedding, Device as DeviceChoice};
use scfm_common::data::CsrMatrix;
use scfm_common::data::h5ad::MatrixSource;
use scfm_common::eval::{Embedding, EvalOptions, Metrics as EvalMetrics, evaluate_embedding_with};
use scfm_common::runtime::Rt;
use serde::Serialize;

use super::embed::Embedder;
use super::input::{BLOCK_ROWS, CellInput, InputOptions};
use super::load::ModelBundle;
use super::pca::{PcaSettings, pca_baseline};
use super::recon::{Reconstruction, reconstruction};
use super::run::{check_alignment, embedding_name};
use crate::error::{Result, WorkerError};
use crate::step::select_device;

/// What `scfm evaluate` was asked to do.
#[derive(Debug, Clone)]
pub struct EvaluateArgs {
    /// Checkpoint URL / directory or export folder.
    pub model: String,
    /// Labelled cells (`.h5ad`).
    pub data: String,
    /// `obs` column of the cell-type labels.
    pub label_key: String,
    /// `obs` column of the batches, if any.
    pub batch_key: Option<String>,
    /// Where `evaluation.json` and `evaluation.md` go.
    pub out: Option<PathBuf>,
    /// Cells per forward pass.
    pub batch_size: usize,
    /// Device.
    pub device: DeviceChoice,
    /// Matrix of the input holding the counts.
    pub source: MatrixSource,
    /// A CSV/TSV input is genes × cells.
    pub transpose: bool,
    /// Vocabulary file for checkpoints without one.
    pub vocab: Option<PathBuf>,
    /// Seed of the folds, clusterings, masks and the random model.
    pub seed: u64,
    /// The PCA baseline's settings.
    pub pca: PcaSettings,
    /// k-means runs per embedding (the k-means scores are their mean); `None`:
    /// [`auto_kmeans_runs`] of the labelled cells.
    pub kmeans_runs: Option<usize>,
    /// Fold assignments the kNN scores are the mean of; `None`: [`auto_knn_repeats`] of
    /// the labelled cells.
    pub knn_repeats: Option<usize>,
    /// The cell embedding, when not the model's own setting (`--embedding`).
    pub embedding: Option<CellEmbedding>,
    /// The decoder metric's weight, when not the model's own `metric_weight`
    /// (`--metric-weight`).
    pub metric_weight: Option<f64>,
}

/// One embedding's row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `scfm`, `random-init` or `pca`.
    pub embedding: String,
    /// What it is.
    pub description: String,
    /// Its width.
    pub dim: usize,
    /// The scores.
    pub metrics: EvalMetrics,
}

/// The whole evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// The data evaluated on.
    pub data: String,
    /// Label column.
    pub label_key: String,
    /// Batch column.
    pub batch_key: Option<String>,
    /// Cells scored (cells with a missing label are left out).
    pub n_cells: usize,
    /// Distinct labels, with their cell counts.
    pub labels: BTreeMap<String, usize>,
    /// The model.
    pub model: String,
    /// Its weights' SHA-256.
    pub model_sha256: String,
    /// Its training steps.
    pub step: u64,
    /// How the model read its cells out, as `uns['scfm']['embedding']` of `scfm embed`
    /// names it (`mean`, `mean+decoder_metric(0.5)`, …).
    pub embedding: String,
    /// Model genes found in the data.
    pub genes_matched: usize,
    /// Genes of the model.
    pub model_genes: usize,
    /// The embeddings' scores: scfm, random-init, pca.
    pub rows: Vec<Row>,
    /// Reconstruction scores of the trained and the random model.
    pub reconstruction: BTreeMap<String, Reconstruction>,
    /// Seed.
    pub seed: u64,
    /// Seconds.
    pub seconds: f64,
}

/// `runs × cells` that [`auto_kmeans_runs`] aims at: on Baron human's 2,142 cells (14
/// labels, 2 cores) 100 runs for the three embeddings took 58 s against 30 s for 5 runs,
/// so this budget adds at most about half a minute with that many labels, at any size
/// (k-means' cost grows with the number of labels).
const KMEANS_CELL_RUNS: usize = 250_000;

/// k-means runs per embedding when `--kmeans-runs` is not given: as many as keep
/// `runs × cells` near 250,000, between 5 and 100 (100 up to 2,500 cells, 12 at 20,000, 5
/// from 50,000). One run's ARI spans 0.5–0.9 on some labelled sets, so small sets, where
/// runs are cheap, get the precision that comparing with PCA needs, and the cost stays
/// bounded for atlases.
pub fn auto_kmeans_runs(cells: usize) -> usize {
    (KMEANS_CELL_RUNS / cells.max(1)).clamp(5, 100)
}

/// `repeats × cells` that [`auto_knn_repeats`] aims at (each repeat is one exact
/// neighbour scan of every cell against the other folds' cells).
const KNN_CELL_REPEATS: usize = 25_000;

/// Fold assignments of the kNN classifier when `--knn-repeats` is not given: as many as
/// keep `repeats × cells` near 25,000, between 1 and 10 (10 up to 2,500 cells, 2 at
/// 12,500, 1 from 25,000). One assignment's accuracy on Baron human's 2,142 cells moves
/// by about two cells with the draw, as much as the gaps the comparison with PCA is
/// about.
pub fn auto_knn_repeats(cells: usize) -> usize {
    (KNN_CELL_REPEATS / cells.max(1)).clamp(1, 10)
}

/// Runs `scfm evaluate` (its storage calls on `rt`).
pub fn run_evaluate(args: &EvaluateArgs, rt: &Rt) -> Result<Evaluation> {
    let t0 = Instant::now();
    let device = select_device(args.device)?;
    let mut bundle = ModelBundle::load(&args.model, device, args.vocab.as_deref(), rt)?;
    bundle.set_read_out(args.embedding, args.metric_weight)?;
    let input = CellInput::open(
        &args.data,
        &InputOptions {
            source: args.source.clone(),
            label_key: Some(args.label_key.clone()),
            batch_key: args.batch_key.clone(),
            cache_dir: None,
            transpose: args.transpose,
        },
        rt,
    )?;
    let a = check_alignment(&input, &bundle)?;
    let labels = input.labels.clone().expect("asked for labels");
    // Cells with a label (anndata writes a missing categorical as NaN).
    let keep: Vec<usize> = (0..labels.len())
        .filter(|&i| !matches!(labels[i].as_str(), "" | "nan" | "NaN"))
        .collect();
    if keep.len() < 10 {
        return Err(WorkerError::Data(format!(
            "{}: only {} cells have a label in obs column `{}`; at least 10 are needed",
            input.describe,
            keep.len(),
            args.label_key
        )));
    }
    let (codes, names) = encode(&keep, &labels);
    let batch_codes = input.batches.as_ref().map(|b| encode(&keep, b).0);
    // Read the counts once.
    let mut parts: Vec<CsrMatrix> = Vec::new();
    input.for_each_block(BLOCK_ROWS, |_, m| {
        parts.push(m);
        Ok(())
    })?;
    let counts = concat(&parts).select_rows(&keep);
    drop(parts);
    eprintln!(
        "evaluating on {} labelled cells ({} labels) of {}",
        keep.len(),
        names.len(),
        input.describe
    );

    let random = ModelBundle::random_init(
        bundle.cfg(),
        bundle.vocab.clone(),
        bundle.target_sum,
        device,
        args.seed,
    )?;
    let mut rows = Vec::new();
    let mut recon = BTreeMap::new();
    for (name, b, description) in [
        (
            "scfm",
            &bundle,
            format!(
                "scfm {} embedding, step {}",
                embedding_name(&bundle),
                bundle.step
            ),
        ),
        (
            "random-init",
            &random,
            "the same architecture, randomly initialised".to_string(),
        ),
    ] {
        let e = Embedder::new(b, args.batch_size);
        let x = e.model_rows(&counts, &a);
        let emb = e.embed(&x)?;
        let metrics = score(&emb, e.dim(), &codes, batch_codes.as_deref(), args)?;
        eprintln!("{name}: {}", summary(&metrics));
        rows.push(Row {
            embedding: name.into(),
            description,
            dim: e.dim(),
            metrics,
        });
        recon.insert(
            name.to_string(),
            reconstruction(b, &x, args.seed, args.batch_size)?,
        );
    }
    let (pcs, k, used) = pca_baseline(&counts, &args.pca)?;
    let metrics = score(&pcs, k, &codes, batch_codes.as_deref(), args)?;
    eprintln!("pca: {}", summary(&metrics));
    rows.push(Row {
        embedding: "pca".into(),
        description: format!(
            "PCA: normalize_total 1e4, log1p, {used} HVG ({:?}), scale, {k} PCs",
            args.pca.flavor
        ),
        dim: k,
        metrics,
    });
    let mut label_counts = BTreeMap::new();
    for &c in &codes {
        *label_counts.entry(names[c as usize].clone()).or_insert(0) += 1;
    }
    let ev = Evaluation {
        data: input.describe.clone(),
        label_key: args.label_key.clone(),
        batch_key: args.batch_key.clone(),
        n_cells: keep.len(),
        labels: label_counts,
        model: bundle.origin.clone(),
        model_sha256: bundle.digest.clone(),
        step: bundle.step,
        embedding: embedding_name(&bundle),
        genes_matched: a.matched,
        model_genes: a.n_model,
        rows,
        reconstruction: recon,
        seed: args.seed,
        seconds: t0.elapsed().as_secs_f64(),
    };
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| WorkerError::Data(format!("{}: {e}", dir.display())))?;
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| WorkerError::Data(format!("{}: {e}", p.display())))
        };
        write(
            "evaluation.json",
            serde_json::to_string_pretty(&ev).expect("serializes") + "\n",
        )?;
        write("evaluation.md", markdown(&ev))?;
    }
    Ok(ev)
}

/// Codes (in order of first appearance, sorted by name) for the kept cells.
fn encode(keep: &[usize], values: &[String]) -> (Vec<u32>, Vec<String>) {
    let mut names: Vec<String> = keep.iter().map(|&i| values[i].clone()).collect();
    names.sort();
    names.dedup();
    let codes = keep
        .iter()
        .map(|&i| names.binary_search(&values[i]).expect("a name") as u32)
        .collect();
    (codes, names)
}

/// Stacks row blocks.
fn concat(parts: &[CsrMatrix]) -> CsrMatrix {
    let n_cols = parts.first().map_or(0, |p| p.n_cols);
    let mut x = CsrMatrix {
        n_rows: 0,
        n_cols,
        indptr: vec![0],
        indices: Vec::new(),
        data: Vec::new(),
    };
    for p in parts {
        let base = x.indices.len() as u64;
        x.indptr.extend(p.indptr[1..].iter().map(|&o| o + base));
        x.indices.extend_from_slice(&p.indices);
        x.data.extend_from_slice(&p.data);
        x.n_rows += p.n_rows;
    }
    x
}

fn score(
    emb: &[f32],
    d: usize,
    labels: &[u32],
    batches: Option<&[u32]>,
    args: &EvaluateArgs,
) -> Result<EvalMetrics> {
    let emb = Embedding::new(emb, labels.len(), d)?;
    let opts = EvalOptions {
        kmeans_runs: args
            .kmeans_runs
            .unwrap_or_else(|| auto_kmeans_runs(labels.len())),
        knn_repeats: args
            .knn_repeats
            .unwrap_or_else(|| auto_knn_repeats(labels.len())),
        ..EvalOptions::default()
    };
    Ok(evaluate_embedding_with(
        &emb, labels, batches, args.seed, &opts,
    )?)
}

/// A metric column of the table: its header and how to read it.
type Column = (&'static str, fn(&EvalMetrics) -> Option<f64>);

/// The table's metric columns (batch columns only with batches).
pub fn columns(with_batches: bool) -> Vec<Column> {
    let mut c: Vec<Column> = vec![
        ("kNN acc (cosine)", |m| Some(m.knn_accuracy)),
        ("kNN macro-F1 (cosine)", |m| Some(m.knn_macro_f1)),
        ("kNN acc (euclidean)", |m| m.knn_euclidean_accuracy),
        ("kNN macro-F1 (euclidean)", |m| m.knn_euclidean_macro_f1),
        ("Leiden ARI", |m| Some(m.leiden_ari)),
        ("Leiden NMI", |m| Some(m.leiden_nmi)),
        ("k-means ARI", |m| Some(m.kmeans_ari)),
        ("k-means NMI", |m| Some(m.kmeans_nmi)),
        ("ASW cell type", |m| Some(m.asw_celltype)),
    ];
    if with_batches {
        c.push(("batch ASW", |m| m.asw_batch));
        c.push(("graph connectivity", |m| m.graph_connectivity));
    }
    c
}

/// One line of the main scores.
fn summary(m: &EvalMetrics) -> String {
    format!(
        "kNN acc {:.3} cosine / {} euclidean, macro-F1 {:.3} / {}, Leiden ARI {:.3} (resolution {}), k-means ARI {:.3} ({:.3}-{:.3}), ASW {:.3}",
        m.knn_accuracy,
        cell(m.knn_euclidean_accuracy),
        m.knn_macro_f1,
        cell(m.knn_euclidean_macro_f1),
        m.leiden_ari,
        m.leiden_resolution,
        m.kmeans_ari,
        m.kmeans_ari_range.0,
        m.kmeans_ari_range.1,
        m.asw_celltype
    )
}

fn cell(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.3}"))
}

/// The evaluation as markdown: the embedding table, then the reconstruction table.
pub fn markdown(ev: &Evaluation) -> String {
    let mut s = format!(
        "# scfm evaluation\n\nData: {} — {} labelled cells, {} labels (`{}`){}; model genes found: {} of {}.\n\nModel: {} (step {}, embedding {}, sha256 {}).\n\n",
        ev.data,
        ev.n_cells,
        ev.labels.len(),
        ev.label_key,
        ev.batch_key
            .as_ref()
            .map_or(String::new(), |b| format!(", batches `{b}`")),
        ev.genes_matched,
        ev.model_genes,
        ev.model,
        ev.step,
        ev.embedding,
        &ev.model_sha256.get(..12).unwrap_or(&ev.model_sha256),
    );
    let cols = columns(ev.batch_key.is_some());
    s.push_str("| embedding | dim |");
    for (h, _) in &cols {
        s.push_str(&format!(" {h} |"));
    }
    s.push_str("\n|---|---:|");
    for _ in &cols {
        s.push_str("---:|");
    }
    s.push('\n');
    for r in &ev.rows {
        s.push_str(&format!("| {} | {} |", r.embedding, r.dim));
        for (_, f) in &cols {
            s.push_str(&format!(" {} |", cell(f(&r.metrics))));
        }
        s.push('\n');
    }
    s.push('\n');
    for r in &ev.rows {
        s.push_str(&format!("- **{}**: {}\n", r.embedding, r.description));
    }
    if let Some(r) = ev.rows.first() {
        let o = scfm_common::eval::EvalOptions::default();
        let runs = r.metrics.kmeans_runs.max(1);
        let ranges: Vec<String> = ev
            .rows
            .iter()
            .map(|r| {
                let (lo, hi) = r.metrics.kmeans_ari_range;
                let se = r.metrics.kmeans_ari_sd / (runs as f64).sqrt();
                format!(
                    "{} {lo:.3}–{hi:.3} (sd {:.3}, se {se:.3})",
                    r.embedding, r.metrics.kmeans_ari_sd
                )
            })
            .collect();
        s.push_str(&format!(
            "\nk-means: k = {} labels; each score is the mean of {runs} runs (each the best of {} restarts; `--kmeans-runs`); the runs' ARI ranged: {}.\n",
            r.metrics.n_labels,
            o.kmeans.n_init,
            ranges.join(", ")
        ));
        let repeats = r.metrics.knn_repeats.max(1);
        let spread = if repeats == 1 {
            "one fold assignment (`--knn-repeats`)".to_string()
        } else {
            let sds: Vec<String> = ev
                .rows
                .iter()
                .map(|r| {
                    let euclid = r
                        .metrics
                        .knn_euclidean_accuracy_sd
                        .map_or(String::new(), |sd| format!(" / {sd:.4}"));
                    format!("{} {:.4}{euclid}", r.embedding, r.metrics.knn_accuracy_sd)
                })
                .collect();
            format!(
                "each score is the mean over {repeats} fold assignments (`--knn-repeats`); the accuracy's sd across them (cosine / euclidean): {}",
                sds.join(", ")
            )
        };
        s.push_str(&format!(
            "\nkNN: k = {}, {}-fold stratified, majority vote among the neighbours by cosine and, on the same folds, by Euclidean distance (cosine ignores a vector's length, Euclidean uses it; each embedding is compared with the others under the same distance); {spread}.\n",
            o.knn_k, o.n_folds
        ));
    }
    s.push_str("\n## Reconstruction (masked expression, the model's own objective)\n\n| model | masked tokens | MGEM loss | masked-bin accuracy | masked Pearson | GEPC Pearson |\n|---|---:|---:|---:|---:|---:|\n");
    for (name, r) in &ev.reconstruction {
        s.push_str(&format!(
            "| {name} | {} | {:.4} | {} | {} | {} |\n",
            r.n_masked,
            r.mgem_loss,
            cell(r.masked_bin_accuracy),
            cell(r.masked_pearson),
            cell(r.gepc_pearson)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{auto_kmeans_runs, auto_knn_repeats};

    #[test]
    fn auto_knn_repeats_keeps_repeats_times_cells_bounded() {
        for (cells, repeats) in [
            (0, 10),
            (700, 10),
            (2_142, 10),
            (2_500, 10),
            (5_000, 5),
            (12_500, 2),
            (25_000, 1),
            (2_000_000, 1),
        ] {
            assert_eq!(auto_knn_repeats(cells), repeats, "{cells} cells");
        }
    }

    #[test]
    fn auto_kmeans_runs_keeps_runs_times_cells_bounded() {
        for (cells, runs) in [
            (0, 100),
            (700, 100),
            (2_142, 100),
            (2_500, 100),
            (5_000, 50),
            (20_000, 12),
            (50_000, 5),
            (2_000_000, 5),
        ] {
            assert_eq!(auto_kmeans_runs(cells), runs, "{cells} cells");
        }
    }
}
