use std::path::{Path, PathBuf};

use super::*;
use crate::testutil::{repo_root, run_script};

fn data(name: &str) -> PathBuf {
    repo_root().join("data").join(name)
}

fn mtx_dir() -> PathBuf {
    repo_root().join(".cache/scanpy-1.11.5/tests/_data/10x_data/3.0.0/filtered_feature_bc_matrix")
}

fn settings() -> PrepareSettings {
    PrepareSettings {
        shard_cells: 3_000,
        min_genes: Some(10),
        make_unique: true,
        read_block: 1_000,
        ..PrepareSettings::default()
    }
}

fn run(inputs: &[PathBuf], out: &Path, s: &PrepareSettings) -> Result<DatasetManifest> {
    prepare(inputs, out.to_str().unwrap(), s, &mut |_| {})
}

/// h5ad + 10x h5 + 10x mtx with a union vocabulary and QC, compared exactly with what
/// Python anndata/scanpy make of the same inputs (common/tests/prepared/check.py).
#[test]
fn prepared_dataset_matches_anndata() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let inputs = vec![data("mouse10k.h5ad"), data("10x_v3.h5"), mtx_dir()];
    let m = run(&inputs, &out, &settings()).unwrap();
    assert!(m.shards.len() >= 4, "{}", m.shards.len());
    assert_eq!(m.sources.len(), 3);
    assert_eq!(m.sources[1].format, "10x h5");
    let spec = serde_json::json!({
        "out": out,
        "min_genes": 10,
        "make_unique": true,
        "inputs": [
            {"path": inputs[0], "reader": "h5ad"},
            {"path": inputs[1], "reader": "10x_h5"},
            {"path": inputs[2], "reader": "10x_mtx"},
        ],
    });
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    run_script("common/tests/prepared/check.py", &spec_path);
}

/// Re-running on the same inputs gives byte-identical shards and vocabulary.
#[test]
fn preparing_twice_gives_identical_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = vec![data("10x_v3.h5"), data("mouse10k.h5ad")];
    let s = PrepareSettings {
        shard_cells: 1_500,
        ..settings()
    };
    let a = run(&inputs, &dir.path().join("a"), &s).unwrap();
    let b = run(&inputs, &dir.path().join("b"), &s).unwrap();
    assert_eq!(a.shards, b.shards);
    assert_eq!(a.vocab_sha256, b.vocab_sha256);
    assert_eq!(a, b);
    // Into the same place again: same shards; stale extra shards of an earlier,
    // finer-sharded run are removed.
    let c_dir = dir.path().join("c");
    run(
        &inputs,
        &c_dir,
        &PrepareSettings {
            shard_cells: 500,
            ..s.clone()
        },
    )
    .unwrap();
    let c = run(&inputs, &c_dir, &s).unwrap();
    assert_eq!(c.shards, a.shards);
    let n = std::fs::read_dir(c_dir.join("shards")).unwrap().count();
    assert_eq!(n, a.shards.len());
}

/// Bad counts stop `prepare` with the file and cell named, and a failed run leaves no
/// `dataset.json` behind (not even the one of an earlier successful run).
#[test]
fn bad_counts_are_named_and_leave_no_dataset_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    run(&[data("10x_v3.h5")], &out, &settings()).unwrap();
    assert!(out.join(DATASET_JSON).is_file());
    for (name, text, what) in [
        (
            "nan.csv",
            "cell,g1,g2\nc1,1,2\nc2,nan,3\n",
            ["non-finite value `nan`", "c2"],
        ),
        (
            "neg.csv",
            "cell,g1,g2\nc1,1,2\nc2,-1,3\n",
            ["negative count", "cell 1"],
        ),
        (
            "frac.csv",
            "cell,g1,g2\nc1,1,2\nc2,0.5,3\n",
            ["non-integer count", "cell 1"],
        ),
    ] {
        let bad = dir.path().join(name);
        std::fs::write(&bad, text).unwrap();
        let e = run(&[data("10x_v3.h5"), bad.clone()], &out, &settings())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(name) && what.iter().all(|w| e.contains(w)),
            "{e}"
        );
        assert!(
            !out.join(DATASET_JSON).exists(),
            "{name}: dataset.json left behind"
        );
    }
    let e = run(&[data("nope.h5ad")], &out, &settings())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.h5ad"), "{e}");
    let e = run(
        &[data("10x_v3.h5")],
        &out,
        &PrepareSettings {
            min_genes: Some(1_000_000),
            ..settings()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no cell passed"), "{e}");
}

#[test]
fn manifest_and_vocab_checks_name_the_problem() {
    let e = DatasetManifest::parse(b"{\"format\": 1}", "x/dataset.json").unwrap_err();
    assert!(e.to_string().contains("x/dataset.json"), "{e}");
    let e = parse_vocab_tsv(
        "token_id\tgene_id\tgene_symbol\n2\tA\ta\n4\tB\tb\n",
        "v.tsv",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("v.tsv") && e.contains("line 3"), "{e}");
    let v = vec![
        VocabEntry {
            gene_id: "ENSG1".into(),
            symbol: "A".into(),
        },
        VocabEntry {
            gene_id: "ENSG2".into(),
            symbol: "B".into(),
        },
    ];
    assert_eq!(parse_vocab_tsv(&vocab_tsv(&v), "v").unwrap(), v);
}

/// `hvg: N` keeps exactly the genes that `seurat_v3` (checked against scanpy elsewhere)
/// selects on the whole QC-passing matrix, in vocabulary order, read in blocks across
/// shards; the shards hold only those genes.
#[test]
fn hvg_vocabulary_is_seurat_v3_on_the_qc_passing_cells() {
    use crate::data::inputs::InputReader;
    use crate::data::preprocess::hvg::seurat_v3;
    use crate::data::preprocess::qc::filter_cells;

    let dir = tempfile::tempdir().unwrap();
    let input = data("mouse10k.h5ad");
    let s = PrepareSettings {
        hvg: Some(200),
        ..settings()
    };
    let m = run(std::slice::from_ref(&input), &dir.path().join("ds"), &s).unwrap();
    assert_eq!(m.n_genes, 200);

    let r = InputReader::open(&input, &s.read_options()).unwrap();
    let x = r.read(0, r.n_rows()).unwrap();
    let qc = filter_cells(&x, &s.cell_filter(), None).unwrap();
    let h = seurat_v3(&qc.x, 200, 0.3).unwrap();
    let want: Vec<&String> = r
        .var_names()
        .iter()
        .zip(&h.highly_variable)
        .filter(|(_, hv)| **hv)
        .map(|(g, _)| g)
        .collect();
    let tsv = std::fs::read_to_string(dir.path().join("ds").join(VOCAB_TSV)).unwrap();
    let got: Vec<&str> = tsv
        .lines()
        .skip(1)
        .map(|l| l.split('\t').nth(1).unwrap())
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        m.n_cells,
        qc.x.n_rows
            - (0..qc.x.n_rows)
                .filter(|&i| {
                    let row = &qc.x.indices[qc.x.indptr[i] as usize..qc.x.indptr[i + 1] as usize];
                    !row.iter().any(|&c| h.highly_variable[c as usize])
                })
                .count()
    );

    // More genes asked for than there are: all kept; 0 is refused by name.
    let all = PrepareSettings {
        hvg: Some(5_000),
        ..settings()
    };
    let m = run(std::slice::from_ref(&input), &dir.path().join("all"), &all).unwrap();
    assert_eq!(m.n_genes, r.var_names().len());
    let zero = PrepareSettings {
        hvg: Some(0),
        ..settings()
    };
    let e = run(&[input], &dir.path().join("zero"), &zero)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hvg"), "{e}");
}
