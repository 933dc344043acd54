//! Value-by-value comparison with Python anndata (the reference) on the repository's real
//! data and on files written into a temporary directory by `common/tests/h5ad/reference.py`
//! (with anndata, or with h5py by hand for the pre-0.7 layout).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;
use crate::testutil::{read_bin, repo_root, run_script, same};

/// One file and what to read from it.
struct Case {
    file: PathBuf,
    source: MatrixSource,
    label: Option<&'static str>,
}

fn case(file: PathBuf, source: MatrixSource, label: Option<&'static str>) -> Case {
    Case {
        file,
        source,
        label,
    }
}

/// Runs the reference script: writes the `make` kinds of test files into `dir`, then dumps
/// what anndata reads for each case into `dir/ref<i>`.
fn reference(dir: &Path, make: &[&str], cases: &[Case]) {
    let dump: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let source = match &c.source {
                MatrixSource::X => "X".to_owned(),
                MatrixSource::Raw => "raw".to_owned(),
                MatrixSource::Layer(l) => format!("layer:{l}"),
            };
            json!({"file": c.file, "source": source, "label": c.label, "out": dir.join(format!("ref{i}"))})
        })
        .collect();
    let spec = dir.join("spec.json");
    std::fs::write(
        &spec,
        json!({"dir": dir, "make": make, "dump": dump}).to_string(),
    )
    .unwrap();
    run_script("common/tests/h5ad/reference.py", &spec);
}

/// Reads case `c` and compares everything with anndata's dump in `out`.
fn check(c: &Case, out: &Path) -> CellDataset {
    let what = format!("{} {:?}", c.file.display(), c.source);
    let opts = H5adOptions {
        source: c.source.clone(),
        label_column: c.label.map(Into::into),
    };
    let ds = read_h5ad(&c.file, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
    let meta: Value =
        serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    let strings = |k: &str| -> Option<Vec<String>> {
        Some(
            meta[k]
                .as_array()?
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect(),
        )
    };
    let dim = |k: &str| meta[k].as_u64().unwrap() as usize;
    assert_eq!(
        (ds.x.n_rows, ds.x.n_cols),
        (dim("n_rows"), dim("n_cols")),
        "{what}: shape"
    );
    assert_eq!(
        Some(&ds.obs_names),
        strings("obs_names").as_ref(),
        "{what}: obs names"
    );
    assert_eq!(
        Some(&ds.var_names),
        strings("var_names").as_ref(),
        "{what}: var names"
    );
    assert_eq!(ds.labels, strings("labels"), "{what}: labels");
    same(
        &what,
        "indptr",
        &ds.x.indptr,
        &read_bin(&out.join("indptr.bin"), u64::from_le_bytes),
    );
    same(
        &what,
        "indices",
        &ds.x.indices,
        &read_bin(&out.join("indices.bin"), u32::from_le_bytes),
    );
    let bits: Vec<u32> = ds.x.data.iter().map(|v| v.to_bits()).collect();
    same(
        &what,
        "data (f32 bits)",
        &bits,
        &read_bin(&out.join("data.bin"), u32::from_le_bytes),
    );
    let (n, var_names) = read_h5ad_header(&c.file, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        (n, &var_names),
        (ds.x.n_rows, &ds.var_names),
        "{what}: header"
    );
    ds
}

fn check_all(make: &[&str], cases: impl FnOnce(&Path) -> Vec<Case>) -> Vec<CellDataset> {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases(dir.path());
    reference(dir.path(), make, &cases);
    cases
        .iter()
        .enumerate()
        .map(|(i, c)| check(c, &dir.path().join(format!("ref{i}"))))
        .collect()
}

#[test]
fn mouse10k_matches_anndata() {
    let file = repo_root().join("data/mouse10k.h5ad");
    let got = check_all(&[], |_| vec![case(file, MatrixSource::X, None)]);
    assert_eq!(
        (got[0].x.n_rows, got[0].x.n_cols, got[0].x.nnz()),
        (10_000, 1000, 691_914)
    );
}

#[test]
fn pbmc68k_reduced_x_and_raw_match_anndata() {
    // anndata < 0.7 layout: dense X, compound obs/var, raw.X as h5sparse CSR, categorical
    // labels as int8 codes with `uns/bulk_labels_categories`.
    let file = repo_root().join("data/pbmc68k_reduced.h5ad");
    let got = check_all(&[], |_| {
        vec![
            case(file.clone(), MatrixSource::X, Some("bulk_labels")),
            case(file, MatrixSource::Raw, Some("bulk_labels")),
        ]
    });
    assert_eq!((got[0].x.n_rows, got[0].x.n_cols), (700, 765));
    assert!(
        got[0]
            .labels
            .as_ref()
            .unwrap()
            .iter()
            .any(|l| l == "CD14+ Monocyte")
    );
}

#[test]
fn anndata_layouts_match_anndata() {
    use MatrixSource::{Layer, Raw, X};
    check_all(&["synthetic"], |d| {
        let f = |name: &str| d.join(name);
        vec![
            case(f("csr_f32.h5ad"), X, Some("cell_type")),
            case(f("csr_f32.h5ad"), Layer("counts".into()), Some("plain")),
            case(f("csr_f32.h5ad"), Layer("dense_f64".into()), None),
            case(f("csc_f64.h5ad"), X, Some("cell_type")),
            case(f("dense_i32.h5ad"), X, None),
            case(f("dense_i32.h5ad"), Raw, Some("plain")),
            case(f("csr_i64.h5ad"), X, Some("cell_type")),
            case(f("unsorted.h5ad"), X, None),
            case(f("cat07.h5ad"), X, Some("cell_type")),
            case(f("nullable.h5ad"), X, Some("nstr")),
        ]
    });
}

#[test]
fn pre_0_7_layout_matches_anndata() {
    check_all(&["legacy"], |d| {
        vec![
            case(d.join("legacy.h5ad"), MatrixSource::X, Some("cell_type")),
            case(d.join("legacy.h5ad"), MatrixSource::Raw, None),
        ]
    });
}

#[test]
fn errors_name_file_and_element() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    reference(d, &["errors"], &[]);
    let err = |file: &str, source: MatrixSource, label: Option<&str>| {
        let opts = H5adOptions {
            source,
            label_column: label.map(Into::into),
        };
        let e = read_h5ad(&d.join(file), &opts).expect_err(file).to_string();
        assert!(e.contains(file), "error does not name the file: {e}");
        e
    };
    let expect = |e: String, part: &str| assert!(e.contains(part), "expected `{part}` in: {e}");

    std::fs::write(d.join("text.h5ad"), "just text\n").unwrap();
    expect(err("text.h5ad", MatrixSource::X, None), "not an HDF5 file");
    expect(err("missing.h5ad", MatrixSource::X, None), "I/O error on");
    expect(
        err("no_x.h5ad", MatrixSource::X, None),
        "no `X` in file (layers: counts)",
    );
    expect(
        err("no_x.h5ad", MatrixSource::Layer("nope".into()), None),
        "no layer `nope` in file (layers: counts)",
    );
    expect(
        err("no_x.h5ad", MatrixSource::Raw, None),
        "no raw matrix in file",
    );
    let counts = || MatrixSource::Layer("counts".into());
    expect(
        err("no_x.h5ad", counts(), Some("nope")),
        "no column `nope` in `obs` (columns: cell_type, n, plain)",
    );
    expect(
        err("no_x.h5ad", counts(), Some("n")),
        "column `obs/n` holds int64; labels must be strings or categorical",
    );
    expect(
        err("bad_enc.h5ad", MatrixSource::X, None),
        "unsupported encoding-type `xyz` for `X`",
    );
    expect(
        err("bad_idx.h5ad", MatrixSource::X, None),
        "`X/indices` has column index 99",
    );
    let e = read_h5ad_header(&d.join("bad_enc.h5ad"), &H5adOptions::default()).unwrap_err();
    expect(e.to_string(), "unsupported encoding-type `xyz` for `X`");
}

#[test]
fn canonicalize_sorts_rows_and_sums_duplicates() {
    let (mut indptr, mut indices, mut data) = (
        vec![0, 3, 3, 5],
        vec![2, 0, 2, 1, 0],
        vec![1.0, 2.0, 3.0, 4.0, 5.0],
    );
    canonicalize(&mut indptr, &mut indices, &mut data);
    assert_eq!(
        (indptr, indices, data),
        (vec![0, 2, 2, 4], vec![0, 2, 0, 1], vec![2.0, 4.0, 5.0, 4.0])
    );
    let (csr_ptr, csr_idx, csr_val) = csc_to_csr(2, 3, &[0, 1, 1, 3], &[1, 1, 0], &[1.0, 2.0, 3.0]);
    assert_eq!(
        (csr_ptr, csr_idx, csr_val),
        (vec![0, 1, 3], vec![2, 0, 2], vec![3.0, 1.0, 2.0])
    );
}
