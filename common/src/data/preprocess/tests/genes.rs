//! Unit tests of loess, highly variable genes, gene lists and vocabularies.

use std::path::Path;

use super::super::genelist::*;
use super::super::hvg::*;
use super::super::loess::*;
use super::super::vocab::*;
use super::names;
use crate::data::CsrMatrix;

#[test]
fn loess_reproduces_a_quadratic() {
    // A local quadratic fit of exact quadratic data is exact; so is Hermite interpolation
    // between exact values and slopes.
    let x: Vec<f64> = (0..200).map(|i| (i as f64 * 0.37).sin() * 3.0).collect();
    let y: Vec<f64> = x.iter().map(|v| 1.0 - 2.0 * v + 0.5 * v * v).collect();
    for s in [Surface::Interpolate, Surface::Direct] {
        let f = loess(&x, &y, 0.3, s).unwrap();
        let err = f
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-9, "{s:?}: {err}");
    }
}

#[test]
fn loess_errors_are_named() {
    let x: Vec<f64> = (0..10).map(f64::from).collect();
    let e = loess(&x, &x, 0.3, Surface::Direct).unwrap_err().to_string();
    assert!(
        e.contains("`span`") && e.contains("leaves 3 per local fit"),
        "{e}"
    );
    let e = loess(&x, &x[..9], 0.5, Surface::Direct)
        .unwrap_err()
        .to_string();
    assert!(e.contains("10 x values but 9 y values"), "{e}");
    let mut tied = vec![1.0; 10];
    tied[9] = 2.0;
    let e = loess(&tied, &x, 0.5, Surface::Direct)
        .unwrap_err()
        .to_string();
    assert!(e.contains("zero-width neighbourhood at x = 1"), "{e}");
}

/// 100 cells × 31 genes: genes 0..30 with regular patterns of small counts (variance
/// close to the mean), gene 30 overdispersed (50 in two cells, else 0).
fn counts() -> CsrMatrix {
    let mut dense = Vec::new();
    for c in 0..100usize {
        for g in 0..30usize {
            dense.push(((c * (g + 1) * 7 + g) % (g % 5 + 2)) as f32);
        }
        dense.push(if c % 50 == 0 { 50.0 } else { 0.0 });
    }
    CsrMatrix::from_dense(100, 31, &dense)
}

#[test]
fn seurat_v3_ranks_overdispersed_genes_first() {
    let h = seurat_v3(&counts(), 2, 0.5).unwrap();
    assert_eq!(h.selected[0], 30, "{:?}", h.variances_norm);
    let constant: Vec<usize> = (0..31).filter(|&g| h.variances[g] == 0.0).collect();
    assert!(!constant.is_empty());
    assert!(
        constant.iter().all(|&g| h.variances_norm[g] == 0.0),
        "constant genes score 0"
    );
    assert_eq!(h.highly_variable.iter().filter(|&&b| b).count(), 2);
    assert_eq!(h.rank[30], Some(0));
    // The selection saved as a gene list resolves back to the same columns.
    let var: Vec<String> = (0..31).map(|g| format!("g{g}")).collect();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("hvg.txt");
    save_gene_list(&list, &h.selected_names(&var)).unwrap();
    let back = load_gene_list(&list).unwrap();
    assert_eq!(
        resolve_gene_list(&back, &list, &var, Path::new("d.h5ad")).unwrap(),
        h.selected
    );
    let one = CsrMatrix::from_dense(1, 2, &[1.0, 2.0]);
    let e = seurat_v3(&one, 1, 0.3).unwrap_err().to_string();
    assert!(e.contains("at least 2 cells, the matrix has 1"), "{e}");
    let e = seurat_v3(&counts(), 0, 0.3).unwrap_err().to_string();
    assert!(e.contains("n_top_genes"), "{e}");
    let zero = CsrMatrix::from_dense(3, 2, &[0.0; 6]);
    let e = seurat_v3(&zero, 1, 0.3).unwrap_err().to_string();
    assert!(
        e.contains("none of the 2 genes varies across the 3 cells"),
        "{e}"
    );
}

/// The streaming form over row blocks gives bit-for-bit the one-shot result.
#[test]
fn seurat_v3_stream_over_blocks_equals_one_shot() {
    let x = counts();
    let whole = seurat_v3(&x, 7, 0.5).unwrap();
    let blocks: Vec<CsrMatrix> = [0..13, 13..50, 50..51, 51..100]
        .into_iter()
        .map(|r| x.select_rows(&r.collect::<Vec<_>>()))
        .collect();
    let mut s = SeuratV3Stream::new(x.n_cols);
    blocks.iter().for_each(|b| s.add_moments(b));
    s.fit(0.5).unwrap();
    blocks.iter().for_each(|b| s.add_clipped(b));
    let streamed = s.finish(7).unwrap();
    assert_eq!(streamed, whole);
    // Too few cells is an error of `fit`, as of the one-shot form.
    let mut one = SeuratV3Stream::new(x.n_cols);
    one.add_moments(&blocks[2]);
    let e = one.fit(0.3).unwrap_err().to_string();
    assert!(e.contains("at least 2 cells, the matrix has 1"), "{e}");
}

#[test]
fn seurat_selects_by_normalized_dispersion() {
    let mut x = counts();
    x.data.iter_mut().for_each(|v| *v = v.ln_1p());
    let p = SeuratParams {
        n_top_genes: Some(2),
        n_bins: 1,
        ..Default::default()
    };
    let h = seurat(&x, &p).unwrap();
    let flat = (0..31)
        .find(|&g| h.dispersions[g].is_nan())
        .expect("a constant gene");
    assert!(h.dispersions_norm[flat].is_nan() && !h.highly_variable[flat]);
    assert_eq!(h.selected.len(), 2);
    assert_eq!(h.selected[0], 30);
    // One gene alone in its bin gets a normalised dispersion of 1.
    let one = CsrMatrix::from_dense(2, 1, &[1.0, 2.0]);
    let h = seurat(&one, &SeuratParams::default()).unwrap();
    assert_eq!(h.dispersions_norm, vec![1.0]);
    let e = seurat(
        &one,
        &SeuratParams {
            n_bins: 0,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("n_bins"), "{e}");
}

#[test]
fn gene_lists_round_trip_and_name_problems() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("hvg.txt");
    let genes = names(&["Xkr4", "Rp1", "ENSMUSG00000025900"]);
    save_gene_list(&p, &genes).unwrap();
    assert_eq!(load_gene_list(&p).unwrap(), genes);
    std::fs::write(&p, "A\r\n\r\nB\n  C \n").unwrap();
    assert_eq!(load_gene_list(&p).unwrap(), names(&["A", "B", "C"]));
    std::fs::write(&p, "A\nB\nA\n").unwrap();
    let e = load_gene_list(&p).unwrap_err().to_string();
    assert!(
        e.contains("hvg.txt") && e.contains("gene `A` appears on lines 1 and 3"),
        "{e}"
    );
    std::fs::write(&p, "\n\n").unwrap();
    assert!(
        load_gene_list(&p)
            .unwrap_err()
            .to_string()
            .contains("no gene names")
    );
    let e = save_gene_list(&p, &names(&["A", "B C\n"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("gene 2"), "{e}");

    let var = names(&["B", "A", "D"]);
    let data = Path::new("d.h5ad");
    assert_eq!(
        resolve_gene_list(&names(&["A", "D"]), &p, &var, data).unwrap(),
        vec![1, 2]
    );
    let e = resolve_gene_list(&names(&["A", "X", "Y"]), &p, &var, data)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hvg.txt")
            && e.contains("2 of its 3 genes are not among the 3 genes of d.h5ad: `X`, `Y`"),
        "{e}"
    );
    let e = resolve_gene_list(&names(&["A"]), &p, &names(&["A", "A"]), data)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("d.h5ad") && e.contains("gene `A` appears twice (columns 1 and 2)"),
        "{e}"
    );
}

#[test]
fn make_unique_like_anndata() {
    assert_eq!(
        make_unique(&names(&["a", "a", "b"])),
        names(&["a", "a-1", "b"])
    );
    assert_eq!(
        make_unique(&names(&["a", "a", "a-1", "a"])),
        names(&["a", "a-2", "a-1", "a-3"])
    );
    assert_eq!(strip_version("ENSG00000141510.16"), "ENSG00000141510");
    assert_eq!(strip_version("HLA-A.1x"), "HLA-A.1x");
}

#[test]
fn vocabularies_and_remaps() {
    let (p1, p2) = (Path::new("one.h5ad"), Path::new("two.h5ad"));
    let (g1, g2) = (names(&["A", "B", "C"]), names(&["C", "D", "A"]));
    let src = [
        GeneSource {
            path: p1,
            names: &g1,
        },
        GeneSource {
            path: p2,
            names: &g2,
        },
    ];
    assert_eq!(
        build_vocab(&src, &VocabMode::Union).unwrap(),
        names(&["A", "B", "C", "D"])
    );
    assert_eq!(
        build_vocab(&src, &VocabMode::Intersection).unwrap(),
        names(&["A", "C"])
    );
    let fixed = VocabMode::Fixed(names(&["D", "A", "Z"]));
    let h = harmonize(&src, &fixed).unwrap();
    assert_eq!(h.vocab, names(&["D", "A", "Z"]));
    let r = &h.remaps[0];
    assert_eq!(r.to_vocab, vec![Some(1), None, None]);
    assert_eq!((r.n_kept(), r.dropped.clone()), (1, names(&["B", "C"])));
    assert_eq!(
        r.summary(),
        "one.h5ad: 1 of 3 genes in the vocabulary of 3, 2 dropped (`B`, `C`)"
    );
    // two.h5ad columns C, D, A -> vocab D, A, Z
    let x = CsrMatrix::from_dense(2, 3, &[1.0, 2.0, 3.0, 4.0, 0.0, 5.0]);
    let y = h.remaps[1].apply(&x).unwrap();
    y.validate("remapped").unwrap();
    assert_eq!(
        y,
        CsrMatrix::from_dense(2, 3, &[2.0, 3.0, 0.0, 0.0, 5.0, 0.0])
    );
    let bad = CsrMatrix::from_dense(1, 2, &[1.0, 1.0]);
    let e = r.apply(&bad).unwrap_err().to_string();
    assert!(
        e.contains("one.h5ad") && e.contains("2 columns but 3 gene names"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let vf = dir.path().join("vocab.txt");
    std::fs::write(&vf, "D\nA\nZ\n").unwrap();
    assert_eq!(VocabMode::fixed_from_file(&vf).unwrap(), fixed);

    let dup = names(&["A", "B", "A"]);
    let src = [
        GeneSource {
            path: p1,
            names: &g1,
        },
        GeneSource {
            path: p2,
            names: &dup,
        },
    ];
    let e = build_vocab(&src, &VocabMode::Union)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("two.h5ad") && e.contains("gene `A` appears twice (columns 1 and 3)"),
        "{e}"
    );
    let g3 = names(&["Q"]);
    let src = [
        GeneSource {
            path: p1,
            names: &g1,
        },
        GeneSource {
            path: p2,
            names: &g3,
        },
    ];
    let e = build_vocab(&src, &VocabMode::Intersection)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Intersection vocabulary of [one.h5ad, two.h5ad] is empty"),
        "{e}"
    );
    let e = build_vocab(&[], &VocabMode::Union).unwrap_err().to_string();
    assert!(e.contains("no datasets"), "{e}");
}
