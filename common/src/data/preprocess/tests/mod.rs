//! Unit tests on small hand-made matrices; `scanpy.rs` compares with scanpy on real data.

mod genes;
mod reference;
mod scanpy;

use std::path::Path;

use super::*;

#[test]
fn normalizes_like_scanpy() {
    let mut v = vec![1.0f32, 3.0];
    normalize_log1p(&mut v, 1e4);
    assert!((v[0] - (2501.0f32).ln()).abs() < 1e-5 && (v[1] - (7501.0f32).ln()).abs() < 1e-5);
}

/// The per-cell table of small counts gives exactly `normalize_total` + `log1p`.
#[test]
fn normalize_log1p_equals_normalize_total_then_log1p_bitwise() {
    let vals: Vec<f32> = (0..500)
        .map(|i| {
            [1.0, 2.0, 1.0, 3.0, 70.0, 1.5, 1.0, 63.0, 64.0, 1000.0][i % 10]
                * ((i % 3) as f32 + 1.0)
        })
        .collect();
    let mut m = CsrMatrix::from_dense(1, vals.len(), &vals);
    normalize::normalize_total(&mut m, Some(1e4)).unwrap();
    normalize::log1p(&mut m);
    let mut v = vals.clone();
    normalize_log1p(&mut v, 1e4);
    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&v), bits(&m.data));
}

#[test]
fn bad_counts_name_cell_and_gene() {
    let names = vec!["A".to_string(), "B".to_string()];
    let m = CsrMatrix::from_dense(2, 2, &[1.0, 0.0, 0.0, -2.0]);
    let e = check_counts(&m, Path::new("c.h5ad"), &names, true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "bad data in c.h5ad: negative count -2 at cell 1, gene 1 (`B`); expected raw counts (finite, >= 0, integer)"
    );
    let m = CsrMatrix::from_dense(1, 2, &[f32::NAN, 1.0]);
    assert!(
        check_counts(&m, Path::new("c.h5ad"), &names, false)
            .unwrap_err()
            .to_string()
            .contains("NaN count")
    );
    let m = CsrMatrix::from_dense(1, 2, &[0.5, 1.0]);
    assert!(
        check_counts(&m, Path::new("c.h5ad"), &names, true)
            .unwrap_err()
            .to_string()
            .contains("non-integer")
    );
    check_counts(&m, Path::new("c.h5ad"), &names, false).unwrap();
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn selects_and_remaps_columns() {
    let m = CsrMatrix::from_dense(2, 3, &[1.0, 0.0, 2.0, 0.0, 3.0, 4.0]);
    let s = select_columns(&m, &[2, 0]);
    assert_eq!(s, CsrMatrix::from_dense(2, 2, &[2.0, 1.0, 4.0, 0.0]));
    s.validate("s").unwrap();
    let ds = CellDataset {
        x: m,
        obs_names: names(&["c0", "c1"]),
        var_names: names(&["a", "b", "c"]),
        labels: Some(names(&["t0", "t1"])),
    };
    let sub = subset_dataset(&ds, &[1], &[1, 2]);
    assert_eq!(sub.x, CsrMatrix::from_dense(1, 2, &[3.0, 4.0]));
    assert_eq!(
        (sub.obs_names, sub.var_names),
        (names(&["c1"]), names(&["b", "c"]))
    );
    assert_eq!(sub.labels, Some(names(&["t1"])));
}

mod qc_and_filters {
    use super::super::qc::*;
    use super::*;

    fn m() -> CsrMatrix {
        // genes: mt-a, b, c ; cell 2 has no counts
        CsrMatrix::from_dense(3, 3, &[1.0, 3.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0])
    }

    #[test]
    fn metrics() {
        let mask = prefix_mask(&names(&["mt-a", "b", "c"]), "mt-");
        let c = cell_qc(&m(), Some(&mask)).unwrap();
        assert_eq!(c.n_genes_by_counts, vec![2, 2, 0]);
        assert_eq!(c.total_counts, vec![4.0, 4.0, 0.0]);
        assert_eq!(c.total_counts_mt, vec![1.0, 0.0, 0.0]);
        assert_eq!(&c.pct_counts_mt[..2], &[25.0, 0.0]);
        assert!(c.pct_counts_mt[2].is_nan(), "0/0 is NaN as in scanpy");
        let g = gene_qc(&m());
        assert_eq!(g.n_cells_by_counts, vec![1, 2, 1]);
        assert_eq!(g.total_counts, vec![1.0, 5.0, 2.0]);
        assert!((g.mean_counts[1] - 5.0 / 3.0).abs() < 1e-15);
        assert!((g.pct_dropout_by_counts[0] - 200.0 / 3.0).abs() < 1e-12);
        let e = cell_qc(&m(), Some(&[true])).unwrap_err().to_string();
        assert!(
            e.contains("mt_mask") && e.contains("1 entries") && e.contains("3 genes"),
            "{e}"
        );
    }

    #[test]
    fn filters() {
        let mask = vec![true, false, false];
        let f = CellFilter {
            min_genes: Some(1),
            max_pct_mt: Some(20.0),
            ..Default::default()
        };
        let r = filter_cells(&m(), &f, Some(&mask)).unwrap();
        assert_eq!((r.kept.clone(), r.n_removed), (vec![1], 2));
        assert_eq!(r.x, CsrMatrix::from_dense(1, 3, &[0.0, 2.0, 2.0]));
        let f = CellFilter {
            max_counts: Some(3.5),
            ..Default::default()
        };
        assert_eq!(filter_cells(&m(), &f, None).unwrap().kept, vec![2]);
        let f = CellFilter {
            max_pct_mt: Some(5.0),
            ..Default::default()
        };
        let e = filter_cells(&m(), &f, None).unwrap_err().to_string();
        assert!(e.contains("max_pct_mt"), "{e}");
        let g = filter_genes(
            &m(),
            &GeneFilter {
                min_cells: Some(2),
                ..Default::default()
            },
        );
        assert_eq!((g.kept.clone(), g.n_removed), (vec![1], 2));
        assert_eq!(g.x, CsrMatrix::from_dense(3, 1, &[3.0, 2.0, 0.0]));
        let g = filter_genes(
            &m(),
            &GeneFilter {
                min_counts: Some(2.0),
                max_cells: Some(1),
                ..Default::default()
            },
        );
        assert_eq!(g.kept, vec![2]);
    }
}

mod normalization {
    use super::super::normalize::*;
    use super::*;

    #[test]
    fn normalize_total_like_scanpy() {
        // totals 4, 2, 0, 6: median over all cells (scanpy's CSR path) = (2 + 4) / 2 = 3
        let mut m = CsrMatrix::from_dense(4, 2, &[1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 3.0, 3.0]);
        assert_eq!(median_f32(&cell_totals(&m)), Some(3.0));
        assert_eq!(normalize_total(&mut m, None).unwrap(), 3.0);
        assert_eq!(
            m.data,
            vec![
                1.0 / (4.0f32 / 3.0),
                3.0 / (4.0f32 / 3.0),
                2.0 / (2.0f32 / 3.0),
                1.5,
                1.5
            ]
        );
        let mut m = CsrMatrix::from_dense(1, 2, &[1.0, 3.0]);
        normalize_total(&mut m, Some(1e4)).unwrap();
        assert_eq!(m.data, vec![2500.0, 7500.0]);
        log1p(&mut m);
        assert_eq!(m.data, vec![2500f32.ln_1p(), 7500f32.ln_1p()]);
        assert_eq!(median_f32(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median_f32(&[]), None);
    }

    #[test]
    fn bad_targets_are_named() {
        let mut m = CsrMatrix::from_dense(3, 1, &[0.0, 0.0, 5.0]);
        let e = normalize_total(&mut m, None).unwrap_err().to_string();
        assert!(
            e.contains("target_sum") && e.contains("median total count of the 3 cells is 0"),
            "{e}"
        );
        let e = normalize_total(&mut m, Some(-1.0)).unwrap_err().to_string();
        assert!(e.contains("target_sum") && e.contains("-1"), "{e}");
    }
}
