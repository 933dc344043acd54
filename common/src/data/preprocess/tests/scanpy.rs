//! Comparison with scanpy 1.11 (the reference) on the repository's real data.
//! `scanpy_reference.py` (run with `$SCFM_PYTHON`) writes scanpy's results into a
//! temporary directory; every check runs and all mismatches are reported together.
//!
//! Tolerances (`|ours - scanpy| <= tol * max(1, |scanpy|)`; observed errors in brackets):
//! - QC metrics, kept cells/genes, `normalize_total` values and its median target: equal
//!   (scanpy's float32 arithmetic is reproduced) [0];
//! - `log1p`: 1e-6 — numpy's float32 `log1p` (SIMD on AVX-512 CPUs) and the C library's
//!   differ by at most 1 ulp [1.2e-7, 1 ulp];
//! - `seurat` means 1e-7, dispersions and normalised dispersions 1e-6 — `expm1` of float32
//!   values differs by 1 ulp in the same way [5e-9, 7e-8, 2.8e-7]; the selected genes equal;
//! - loess fits and `seurat_v3` variances 1e-12 — float64 rounding [3e-15, 2.4e-14]; the
//!   selected genes equal except that genes with exactly equal `variances_norm` at the cut
//!   may be swapped: scanpy breaks such ties with numpy's unstable, CPU-dependent argsort,
//!   we by gene index.

use super::reference::{
    Report, f32s, f64s, flags, max_ulps, reference, repo_root, same_up_to_ties, usizes,
};
use crate::data::h5ad::{H5adOptions, MatrixSource, read_h5ad};
use crate::data::preprocess::hvg::{SeuratParams, seurat, seurat_v3};
use crate::data::preprocess::loess::{Surface, loess};
use crate::data::preprocess::normalize::{log1p, normalize_total};
use crate::data::preprocess::qc::{
    CellFilter, GeneFilter, cell_qc, filter_cells, filter_genes, gene_qc, prefix_mask,
};
use crate::data::preprocess::vocab::{
    ColumnRemap, GeneSource, VocabMode, build_vocab, make_unique,
};

#[test]
fn mouse10k_preprocessing_matches_scanpy() {
    let data = repo_root().join("data/mouse10k.h5ad");
    let dir = reference("mouse10k", &data);
    let d = dir.path();
    let ds = read_h5ad(&data, &H5adOptions::default()).unwrap();
    let symbols: Vec<String> = std::fs::read_to_string(d.join("symbols.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let mut rep = Report::default();

    // QC: mouse10k has no `mt-` gene, so `Gm*` genes (258) exercise a non-empty mask too.
    for (q, prefix) in [("mt", "mt-"), ("gm", "Gm")] {
        let mask = prefix_mask(&symbols, prefix);
        let c = cell_qc(&ds.x, Some(&mask)).unwrap();
        let n_genes: Vec<usize> = c.n_genes_by_counts.iter().map(|&v| v as usize).collect();
        rep.same("n_genes_by_counts", &n_genes, &usizes(d, "qc_n_genes.i64"));
        rep.close(
            "total_counts",
            &c.total_counts,
            &f32s(d, "qc_total.f32"),
            0.0,
        );
        rep.close(
            &format!("total_counts_{q}"),
            &c.total_counts_mt,
            &f32s(d, &format!("qc_total_{q}.f32")),
            0.0,
        );
        rep.close(
            &format!("pct_counts_{q}"),
            &c.pct_counts_mt,
            &f32s(d, &format!("qc_pct_{q}.f32")),
            0.0,
        );
    }
    let g = gene_qc(&ds.x);
    let n_cells: Vec<usize> = g.n_cells_by_counts.iter().map(|&v| v as usize).collect();
    rep.same("n_cells_by_counts", &n_cells, &usizes(d, "qc_n_cells.i64"));
    rep.close(
        "gene total_counts",
        &g.total_counts,
        &f32s(d, "qc_gene_total.f32"),
        0.0,
    );
    rep.close(
        "mean_counts",
        &g.mean_counts,
        &f64s(d, "qc_gene_mean.f64"),
        1e-12,
    );
    rep.close(
        "pct_dropout_by_counts",
        &g.pct_dropout_by_counts,
        &f64s(d, "qc_gene_dropout.f64"),
        1e-12,
    );

    // normalize_total on all cells (one has no counts; the median includes it, as in scanpy).
    let mut all = ds.x.clone();
    normalize_total(&mut all, None).unwrap();
    rep.close(
        "normalize_total (unfiltered)",
        &all.data,
        &f32s(d, "norm_all.f32"),
        0.0,
    );

    // filter_cells(min_genes=20), then filter_genes(min_cells=10).
    let cells = filter_cells(
        &ds.x,
        &CellFilter {
            min_genes: Some(20),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let genes = filter_genes(
        &cells.x,
        &GeneFilter {
            min_cells: Some(10),
            ..Default::default()
        },
    );
    rep.same("kept cells", &cells.kept, &usizes(d, "kept_cells.i64"));
    rep.same("kept genes", &genes.kept, &usizes(d, "kept_genes.i64"));
    let counts = genes.x;

    // Vocabulary: mouse10k's symbols repeat (e.g. `Rp1`), an error naming file and gene;
    // make_unique renames as anndata's make_index_unique does. Remapping the cells kept
    // above into the vocabulary of the kept genes reproduces filter_genes.
    let e = build_vocab(
        &[GeneSource {
            path: &data,
            names: &symbols,
        }],
        &VocabMode::Union,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("mouse10k.h5ad") && e.contains("gene `Rp1` appears twice"),
        "{e}"
    );
    let unique: Vec<String> = std::fs::read_to_string(d.join("symbols_unique.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    rep.same("make_unique", &make_unique(&symbols), &unique);
    let kept: Vec<String> = genes
        .kept
        .iter()
        .map(|&g| ds.var_names[g].clone())
        .collect();
    let src = GeneSource {
        path: &data,
        names: &ds.var_names,
    };
    let remap = ColumnRemap::new(&src, &kept).unwrap();
    assert_eq!(remap.dropped.len(), ds.var_names.len() - kept.len());
    rep.same(
        "remapped into kept genes",
        &[remap.apply(&cells.x).unwrap()],
        std::slice::from_ref(&counts),
    );

    // normalize_total + log1p.
    let mut x = counts.clone();
    let target = normalize_total(&mut x, None).unwrap();
    let indptr: Vec<usize> = x.indptr.iter().map(|&v| v as usize).collect();
    rep.same("normalized indptr", &indptr, &usizes(d, "norm_indptr.i64"));
    rep.close("normalize_total", &x.data, &f32s(d, "norm.f32"), 0.0);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("meta.json")).unwrap()).unwrap();
    rep.close(
        "median total",
        &[f64::from(target)],
        &[meta["median_total"].as_f64().unwrap()],
        0.0,
    );
    log1p(&mut x);
    let want_log = f32s(d, "log.f32");
    rep.close("log1p", &x.data, &want_log, 1e-6);
    if x.data.len() == want_log.len() {
        eprintln!(
            "log1p: max difference from scanpy {} ulp",
            max_ulps(&x.data, &want_log)
        );
    }

    // HVG seurat on our log data and on scanpy's (read back from the h5ad it wrote).
    let scanpy_log = read_h5ad(&d.join("log.h5ad"), &H5adOptions::default())
        .unwrap()
        .x;
    for (input, m) in [("ours", &x), ("scanpy's log data", &scanpy_log)] {
        for (prefix, n_top) in [("seurat_top", Some(200)), ("seurat_cut", None)] {
            let p = SeuratParams {
                n_top_genes: n_top,
                ..Default::default()
            };
            let h = seurat(m, &p).unwrap();
            let what = format!("{prefix} on {input}");
            rep.close(
                &format!("{what}: means"),
                &h.means,
                &f64s(d, &format!("{prefix}_means.f64")),
                1e-7,
            );
            rep.close(
                &format!("{what}: dispersions"),
                &h.dispersions,
                &f64s(d, &format!("{prefix}_disp.f64")),
                1e-6,
            );
            rep.close(
                &format!("{what}: dispersions_norm"),
                &h.dispersions_norm,
                &f64s(d, &format!("{prefix}_disp_norm.f64")),
                1e-6,
            );
            rep.same(
                &format!("{what}: highly_variable"),
                &h.highly_variable,
                &flags(d, &format!("{prefix}_hv.u8")),
            );
        }
    }

    // The loess of seurat_v3 alone, on scanpy's inputs: skmisc agrees to rounding.
    let (lx, ly) = (f64s(d, "loess_x.f64"), f64s(d, "loess_y.f64"));
    for (name, surface) in [
        ("interpolate", Surface::Interpolate),
        ("direct", Surface::Direct),
    ] {
        let fit = loess(&lx, &ly, 0.3, surface).unwrap();
        let want = f64s(d, &format!("loess_{name}.f64"));
        let err = fit
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!("loess {name}: max |ours - skmisc| = {err:e}");
        rep.close(&format!("loess {name}"), &fit, &want, 1e-12);
    }

    // HVG seurat_v3 (n_top_genes=200) on the filtered and on the unfiltered counts.
    for (prefix, m) in [("v3", &counts), ("v3raw", &ds.x)] {
        let h = seurat_v3(m, 200, 0.3).unwrap();
        rep.close(
            &format!("{prefix}: means"),
            &h.means,
            &f64s(d, &format!("{prefix}_means.f64")),
            1e-12,
        );
        rep.close(
            &format!("{prefix}: variances"),
            &h.variances,
            &f64s(d, &format!("{prefix}_vars.f64")),
            1e-12,
        );
        let want_norm = f64s(d, &format!("{prefix}_vars_norm.f64"));
        rep.close(
            &format!("{prefix}: variances_norm"),
            &h.variances_norm,
            &want_norm,
            1e-12,
        );
        let want = flags(d, &format!("{prefix}_hv.u8"));
        if let Err(e) = same_up_to_ties(&h.highly_variable, &want, &want_norm) {
            rep.fail(format!("{prefix}: highly_variable: {e}"));
        }
    }
    rep.finish("mouse10k");
}

#[test]
fn pbmc68k_seurat_hvg_matches_scanpy() {
    let data = repo_root().join("data/pbmc68k_reduced.h5ad");
    let dir = reference("pbmc", &data);
    let d = dir.path();
    let opts = H5adOptions {
        source: MatrixSource::Raw,
        ..Default::default()
    };
    let x = read_h5ad(&data, &opts).unwrap().x;
    let mut rep = Report::default();
    for (prefix, n_top) in [("pbmc_top", Some(100)), ("pbmc_cut", None)] {
        let h = seurat(
            &x,
            &SeuratParams {
                n_top_genes: n_top,
                ..Default::default()
            },
        )
        .unwrap();
        rep.close(
            &format!("{prefix}: means"),
            &h.means,
            &f64s(d, &format!("{prefix}_means.f64")),
            1e-7,
        );
        rep.close(
            &format!("{prefix}: dispersions_norm"),
            &h.dispersions_norm,
            &f64s(d, &format!("{prefix}_disp_norm.f64")),
            1e-6,
        );
        rep.same(
            &format!("{prefix}: highly_variable"),
            &h.highly_variable,
            &flags(d, &format!("{prefix}_hv.u8")),
        );
    }
    rep.finish("pbmc68k_reduced raw");
}
