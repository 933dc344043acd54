//! Every reader compared value by value with scanpy / anndata (the reference) on the
//! repository's real 10x files, scanpy's 10x test folders, and loom / CSV / mtx / h5 files
//! written from real counts by `common/tests/readers/reference.py`; and the messages of
//! bad inputs. Built with `cfg(test)`, so HDF5 data is read in blocks of 1,000 values and
//! loom matrices in blocks of 64 cells.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;
use crate::testutil::{read_bin, repo_root, run_script, same};

/// scanpy's 10x test data (CellRanger 1.2.0 and 3.0.0 outputs).
fn tenx_data(rel: &str) -> PathBuf {
    repo_root()
        .join(".cache/scanpy-1.11.5/tests/_data/10x_data")
        .join(rel)
}

/// One file, how to read it here, and how scanpy reads it (`py`, see reference.py).
struct Case {
    file: PathBuf,
    format: InputFormat,
    opts: ReadOptions,
    py: Value,
}

fn case(file: PathBuf, format: InputFormat, opts: ReadOptions, py: Value) -> Case {
    Case {
        file,
        format,
        opts,
        py,
    }
}

/// Runs the reference script: with `make`, writes the test files into `dir`; then dumps
/// what scanpy reads for each case into `dir/ref<i>`.
fn reference(dir: &Path, make: bool, cases: &[Case]) {
    let dump: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = c.py.clone();
            v["path"] = json!(c.file);
            v["out"] = json!(dir.join(format!("ref{i}")));
            v
        })
        .collect();
    let spec = dir.join("spec.json");
    let spec_json = json!({"dir": dir, "repo": repo_root(), "make": make, "dump": dump});
    std::fs::write(&spec, spec_json.to_string()).unwrap();
    run_script("common/tests/readers/reference.py", &spec);
}

/// Reads case `c` with [`read_any`] and compares everything with scanpy's dump in `out`.
fn check(c: &Case, out: &Path) -> CellDataset {
    let what = format!("{} {}", c.file.display(), c.py);
    assert_eq!(detect_format(&c.file).unwrap(), c.format, "{what}: format");
    let ds = read_any(&c.file, &c.opts).unwrap_or_else(|e| panic!("{what}: {e}"));
    let meta: Value =
        serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    let strings = |k: &str| -> Vec<String> {
        let v = meta[k].as_array().unwrap();
        v.iter().map(|s| s.as_str().unwrap().to_owned()).collect()
    };
    let dim = |k: &str| meta[k].as_u64().unwrap() as usize;
    let shape = (ds.x.n_rows, ds.x.n_cols);
    assert_eq!(shape, (dim("n_rows"), dim("n_cols")), "{what}: shape");
    same(&what, "obs names", &ds.obs_names, &strings("obs_names"));
    same(&what, "var names", &ds.var_names, &strings("var_names"));
    let indptr = read_bin(&out.join("indptr.bin"), u64::from_le_bytes);
    same(&what, "indptr", &ds.x.indptr, &indptr);
    let indices = read_bin(&out.join("indices.bin"), u32::from_le_bytes);
    same(&what, "indices", &ds.x.indices, &indices);
    let bits: Vec<u32> = ds.x.data.iter().map(|v| v.to_bits()).collect();
    let want = read_bin(&out.join("data.bin"), u32::from_le_bytes);
    same(&what, "data (f32 bits)", &bits, &want);
    ds
}

fn check_all(make: bool, cases: impl FnOnce(&Path) -> Vec<Case>) -> Vec<CellDataset> {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases(dir.path());
    reference(dir.path(), make, &cases);
    cases
        .iter()
        .enumerate()
        .map(|(i, c)| check(c, &dir.path().join(format!("ref{i}"))))
        .collect()
}

fn opts(f: impl FnOnce(&mut ReadOptions)) -> ReadOptions {
    let mut o = ReadOptions::default();
    f(&mut o);
    o
}

fn ids() -> ReadOptions {
    opts(|o| o.gene_id_column = GeneIdColumn::Ids)
}

#[test]
fn tenx_h5_matches_scanpy() {
    use InputFormat::TenxH5;
    let data = |f: &str| repo_root().join("data").join(f);
    let genome = |g: &str| opts(|o| o.genome = Some(g.into()));
    let got = check_all(true, |d| {
        let two = d.join("two_genomes.h5");
        vec![
            case(
                data("10x_v3.h5"),
                TenxH5,
                opts(|_| {}),
                json!({"fn": "10x_h5"}),
            ),
            case(
                data("10x_v3.h5"),
                TenxH5,
                ids(),
                json!({"fn": "10x_h5", "ids": true}),
            ),
            case(
                data("10x_v2.h5"),
                TenxH5,
                opts(|_| {}),
                json!({"fn": "10x_h5"}),
            ),
            case(
                data("10x_v2.h5"),
                TenxH5,
                opts(|o| {
                    o.genome = Some("hg19_chr21".into());
                    o.gene_id_column = GeneIdColumn::Ids;
                }),
                json!({"fn": "10x_h5", "genome": "hg19_chr21", "ids": true}),
            ),
            case(
                tenx_data("1.2.0/multiple_genomes.h5"),
                TenxH5,
                genome("another_genome"),
                json!({"fn": "10x_h5", "genome": "another_genome"}),
            ),
            case(
                tenx_data("3.0.0/filtered_feature_bc_matrix.h5"),
                TenxH5,
                opts(|_| {}),
                json!({"fn": "10x_h5"}),
            ),
            case(two.clone(), TenxH5, opts(|_| {}), json!({"fn": "10x_h5"})),
            case(
                two.clone(),
                TenxH5,
                genome("mm10"),
                json!({"fn": "10x_h5", "genome": "mm10"}),
            ),
            case(
                two,
                TenxH5,
                opts(|o| o.feature_type = None),
                json!({"fn": "10x_h5", "gex_only": false}),
            ),
        ]
    });
    assert_eq!(
        (got[0].x.n_rows, got[0].x.n_cols, got[0].x.nnz()),
        (1107, 507, 23_866)
    );
    assert_eq!((got[2].x.n_rows, got[2].x.n_cols), (12, 343));
    // two_genomes.h5: every 10th feature is "Antibody Capture", every 3rd of genome mm10.
    assert_eq!(
        [got[6].x.n_cols, got[7].x.n_cols, got[8].x.n_cols],
        [456, 152, 507]
    );
}

#[test]
fn mtx_matches_scanpy() {
    use InputFormat::Mtx;
    let v3 = tenx_data("3.0.0/filtered_feature_bc_matrix");
    let v2 = tenx_data("1.2.0/filtered_gene_bc_matrices/hg19_chr21");
    let mtx = |extra: Value| {
        let mut v = json!({"fn": "10x_mtx"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let unique = opts(|o| o.make_unique = true);
    let got = check_all(true, |d| {
        vec![
            case(v3.clone(), Mtx, opts(|_| {}), mtx(json!({}))),
            case(v3, Mtx, ids(), mtx(json!({"var_names": "gene_ids"}))),
            case(v2.clone(), Mtx, opts(|_| {}), mtx(json!({}))),
            case(
                v2.clone(),
                Mtx,
                ids(),
                mtx(json!({"var_names": "gene_ids"})),
            ),
            case(v2.join("matrix.mtx"), Mtx, opts(|_| {}), mtx(json!({}))),
            case(
                d.join("mtx_dup"),
                Mtx,
                unique,
                mtx(json!({"make_unique": true})),
            ),
            case(d.join("mtx_dup"), Mtx, opts(|_| {}), mtx(json!({}))),
            case(d.join("mtx_real"), Mtx, opts(|_| {}), mtx(json!({}))),
            case(
                d.join("mtx_real/matrix.mtx.gz"),
                Mtx,
                opts(|o| o.feature_type = None),
                mtx(json!({"gex_only": false})),
            ),
        ]
    });
    assert_eq!((got[0].x.n_rows, got[0].x.n_cols), (1107, 507));
    assert_eq!(
        got[5].var_names[1..6],
        ["APP", "APP-2", "APP-1", "ADAMTS5", "APP-3"]
    );
    assert_eq!([got[7].x.n_cols, got[8].x.n_cols], [497, 507]);
}

#[test]
fn loom_and_csv_match_anndata() {
    use InputFormat::{Csv, Loom};
    let loom = json!({"fn": "loom"});
    let csv = |delimiter: Option<&str>| json!({"fn": "csv", "delimiter": delimiter});
    let got = check_all(true, |d| {
        vec![
            case(d.join("counts.loom"), Loom, opts(|_| {}), loom.clone()),
            case(
                d.join("counts.loom"),
                Loom,
                ids(),
                json!({"fn": "loom", "var_names": "Accession"}),
            ),
            case(d.join("int.loom"), Loom, opts(|_| {}), loom.clone()),
            case(d.join("norm.loom"), Loom, opts(|_| {}), loom),
            case(d.join("counts.csv"), Csv, opts(|_| {}), csv(Some(","))),
            case(d.join("counts.tsv"), Csv, opts(|_| {}), csv(Some("\t"))),
            case(d.join("counts.csv.gz"), Csv, opts(|_| {}), csv(Some(","))),
            case(
                d.join("counts_t.tsv.gz"),
                Csv,
                opts(|o| o.transpose = true),
                json!({"fn": "csv", "delimiter": "\t", "transpose": true}),
            ),
            case(d.join("norm.txt"), Csv, opts(|_| {}), csv(Some("\t"))),
            case(d.join("space.txt"), Csv, opts(|_| {}), csv(None)),
        ]
    });
    assert_eq!((got[0].x.n_rows, got[0].x.n_cols), (1107, 507));
    assert_eq!(got[2].var_names[3], "Gén_ä&co");
    assert_eq!((got[7].x.n_rows, got[7].x.n_cols), (300, 507));
    assert_eq!(got[4].x, got[0].x);
}

#[test]
fn make_unique_follows_anndata() {
    let mut names: Vec<String> = ["a", "a", "a-1", "b", "a"].map(String::from).to_vec();
    make_unique(&mut names);
    assert_eq!(names, ["a", "a-2", "a-1", "b", "a-3"]);
}
