//! Inputs as a new user tries them: `scfm validate` on every kind of file and from the
//! file's own folder, training on values that are not counts, genes × cells CSV files,
//! counts float32 cannot hold, and repeated cell names.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use scfm_common::data::CsrMatrix;
use scfm_common::data::h5ad::write::{ShardContents, WriteOptions, write_h5ad};
use scfm_common::data::h5ad::{H5adOptions, read_h5ad};
use scfm_tests::{bin, repo_root, run_with_timeout};

fn scfm(args: &[&str], dir: &Path) -> Output {
    run_with_timeout(
        Command::new(bin("scfm"))
            .args(args)
            .current_dir(dir)
            .env("RUST_BACKTRACE", "0"),
        Duration::from_secs(300),
    )
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `scfm validate FILE`, run in `dir`, succeeds and says FILE is valid as `kind`.
fn assert_valid(dir: &Path, file: &str, kind: &str) {
    let o = scfm(&["validate", file], dir);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{file}: {err}");
    assert!(
        out.starts_with(&format!("# {file} is valid: {kind}")),
        "{file}: {out}"
    );
}

/// A temporary tree laid out as a user has the repository: `configs/` holding copies of
/// the named files of this repository's `configs/`, beside `data/` holding copies of the
/// named datasets of its `data/`. Returns the tree and both folders.
fn config_tree(configs: &[&str], datasets: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tree = tempfile::tempdir().unwrap();
    let (config_dir, data_dir) = (tree.path().join("configs"), tree.path().join("data"));
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&data_dir).unwrap();
    for file in configs {
        std::fs::copy(
            repo_root().join("configs").join(file),
            config_dir.join(file),
        )
        .unwrap();
    }
    for file in datasets {
        std::fs::copy(scfm_tests::dataset(file), data_dir.join(file)).unwrap();
    }
    (tree, config_dir, data_dir)
}

/// `scfm validate` accepts each kind of file, says which kind it is, and resolves the
/// paths of a file named without a folder (run from the file's own folder).
#[test]
fn validate_tells_the_kinds_apart_from_the_files_own_folder() {
    // The demo files as a user has them after `scripts/demo.sh`: `configs/` beside a
    // `data/` folder holding the demo input and its prepared dataset (made here, so the
    // test does not depend on the demo having run in this checkout).
    // `_tree` keeps the folder alive to the test's end.
    let (_tree, configs, data_dir) = config_tree(
        &["job-local.yaml", "train-demo.yaml", "prepare-demo.yaml"],
        &["mouse10k.h5ad"],
    );
    let o = scfm(
        &[
            "prepare",
            "../data/mouse10k.h5ad",
            "--out",
            "../data/mouse10k-prepared",
            "--settings",
            "prepare-demo.yaml",
        ],
        &configs,
    );
    assert!(o.status.success(), "prepare: {}", text(&o).1);
    for (file, kind) in [
        ("job-local.yaml", "a job manifest"),
        ("train-demo.yaml", "a training file for one process"),
        ("prepare-demo.yaml", "settings of scfm prepare"),
    ] {
        assert_valid(&configs, file, kind);
    }
    let o = scfm(&["validate", "train-demo.yaml"], &configs);
    let data = data_dir.join("mouse10k.h5ad");
    assert!(
        text(&o).0.contains(&format!("path: {}", data.display())),
        "{}",
        text(&o).0
    );
    // `scfm local` reads a bare file name the same way: the error is about the data.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("job.yaml"),
        "run_id: j\ndata: {path: missing-prepared}\ncluster: {max_workers: 1}\ncheckpoint: {url: ckpt}\n",
    )
    .unwrap();
    for cmd in [
        &["local", "job.yaml", "--workers", "1"][..],
        &["validate", "job.yaml"],
    ] {
        let o = scfm(cmd, dir.path());
        let (_, err) = text(&o);
        assert!(!o.status.success());
        assert!(
            err.contains("invalid config `data.path`") && err.contains("missing-prepared"),
            "{cmd:?}: {err}"
        );
    }
}

/// The evaluation's training files (configs/train-pbmc*.yaml) validate once their data is
/// where their comments say, the joint one after the `scfm prepare` command it gives:
/// pbmc68k's 700 cells and pbmc3k's 2,700 over pbmc68k's 765 genes.
#[test]
fn the_pbmc_training_files_validate_on_the_data_their_comments_make() {
    let (tree, configs, data_dir) = config_tree(
        &["train-pbmc.yaml", "train-pbmc-joint.yaml"],
        &["pbmc68k_counts.h5ad", "pbmc3k_counts.h5ad"],
    );
    // The command of train-pbmc-joint.yaml's comment, run from the tree's root.
    let o = scfm(
        &[
            "prepare",
            "data/pbmc68k_counts.h5ad",
            "data/pbmc3k_counts.h5ad",
            "--vocab",
            "intersection",
            "--out",
            "data/pbmc-joint",
        ],
        tree.path(),
    );
    assert!(o.status.success(), "prepare: {}", text(&o).1);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("pbmc-joint/dataset.json")).unwrap())
            .unwrap();
    assert_eq!(meta["n_cells"], 3400, "{meta}");
    assert_eq!(meta["n_genes"], 765, "{meta}");
    for file in ["train-pbmc.yaml", "train-pbmc-joint.yaml"] {
        assert_valid(&configs, file, "a training file for one process");
    }
}

/// Writes `cells` × `genes` values made by `value(cell, gene)` as an `.h5ad`.
fn write_matrix(path: &Path, cells: usize, genes: usize, value: impl Fn(usize, usize) -> f32) {
    let dense: Vec<f32> = (0..cells * genes)
        .map(|i| value(i / genes, i % genes))
        .collect();
    let x = CsrMatrix::from_dense(cells, genes, &dense);
    let obs: Vec<String> = (0..cells).map(|c| format!("cell{c}")).collect();
    let var: Vec<String> = (0..genes).map(|g| format!("Gene{g}")).collect();
    let contents = ShardContents {
        x: &x,
        obs_names: &obs,
        var_names: &var,
        var_columns: &[],
        obs_columns: &[],
    };
    write_h5ad(path, &contents, &WriteOptions::default()).unwrap();
}

fn train_file(dir: &Path, data: &str) -> PathBuf {
    let p = dir.join("train.yaml");
    std::fs::write(
        &p,
        format!(
            "data: {{{data}}}\nmodel: {{preset: minimal, n_layers: 1, hidden: 32, n_heads: 2, ffn_dim: 64, max_seq_len: 32}}\ntraining: {{max_steps: 2, batch_size: 4, threads: 1, eval_every: 1000}}\ncheckpoint: {{url: ckpt, every_steps: 1000}}\n"
        ),
    )
    .unwrap();
    p
}

/// `scfm train` on a log-normalised file is refused as `scfm prepare` refuses it, naming
/// the cell, the gene and the setting; `data.allow_non_integer` lets it train.
#[test]
fn training_refuses_values_that_are_not_counts_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    write_matrix(&dir.path().join("lognorm.h5ad"), 40, 20, |c, g| {
        if (c + g) % 3 == 0 {
            ((1 + (c * g) % 5) as f32).ln_1p()
        } else {
            0.0
        }
    });
    train_file(dir.path(), "path: lognorm.h5ad");
    for cmd in [
        &["train", "--config", "train.yaml"][..],
        &["prepare", "lognorm.h5ad", "--out", "prepared"],
    ] {
        let o = scfm(cmd, dir.path());
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{cmd:?}: {err}");
        assert!(
            err.contains("non-integer count 0.6931472 at cell 0, gene 0 (`Gene0`)")
                && err.contains("data.allow_non_integer: true"),
            "{cmd:?}: {err}"
        );
    }
    train_file(dir.path(), "path: lognorm.h5ad, allow_non_integer: true");
    let o = scfm(&["train", "--config", "train.yaml"], dir.path());
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("values are not integers"), "{err}");
}

/// Genes (rows) × cells (columns), as many tools write a count table.
const GENES_BY_CELLS: &str = "gene,AAACATACAACCAC-1,AAACATTGAGCTAC-1,AAACATTGATCAGC-1,AAACCGTGCTTCCG-1\n\
MT-CO1,3,0,1,2\nACTB,5,2,0,1\nCD3E,0,1,4,0\nMT-ND1,1,1,0,2\nGAPDH,2,0,3,1\n";

/// A genes × cells CSV read as cells × genes is named in a warning; `--transpose`
/// (prepare) and `data.transpose` (training) read it right, without the warning.
#[test]
fn a_genes_by_cells_csv_is_flagged_and_transpose_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.csv"), GENES_BY_CELLS).unwrap();
    let o = scfm(&["prepare", "t.csv", "--out", "as-is"], dir.path());
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("cell and gene names look swapped")
            && err.contains("4 of the 4 gene names look like cell names")
            && err.contains("--transpose"),
        "{err}"
    );
    let o = scfm(
        &["prepare", "t.csv", "--out", "t", "--transpose"],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("look swapped"), "{err}");
    let shard = read_h5ad(
        &dir.path().join("t/shards/shard-000000.h5ad"),
        &H5adOptions::default(),
    )
    .unwrap();
    assert_eq!(shard.obs_names[0], "AAACATACAACCAC-1");
    assert_eq!(
        shard.var_names,
        ["MT-CO1", "ACTB", "CD3E", "MT-ND1", "GAPDH"]
    );
    // Cell 0: MT-CO1 3, ACTB 5, MT-ND1 1, GAPDH 2.
    assert_eq!(shard.x.row(0).1, [3.0, 5.0, 1.0, 2.0]);

    // Names of no telling pattern: the genes of another input give it away.
    std::fs::write(
        dir.path().join("rows.csv"),
        ",c1,c2\nACTB,1,2\nCD3E,0,3\nGAPDH,4,0\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("cols.csv"), ",ACTB,CD3E,GAPDH\nd1,1,2,3\n").unwrap();
    let o = scfm(
        &["prepare", "cols.csv", "rows.csv", "--out", "two"],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(
            "100% of the cell names but 0% of the gene names are genes of the other inputs"
        ) && err.contains("rows.csv"),
        "{err}"
    );
    train_file(
        dir.path(),
        "path: t.csv, transpose: true, validation_fraction: 0",
    );
    let o = scfm(&["train", "--config", "train.yaml"], dir.path());
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("t.csv (4 cells x 5 genes, in memory)") && !err.contains("look swapped"),
        "{err}"
    );
}

/// A count float32 cannot hold exactly is refused with the cell and the gene.
#[test]
fn counts_beyond_float32_are_refused_by_cell_and_gene() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("big.csv"),
        "cell,Actb,Gapdh\nc1,16777217,2\nc2,3,1\n",
    )
    .unwrap();
    let o = scfm(&["prepare", "big.csv", "--out", "p"], dir.path());
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("count 16777216 at cell 0, gene 0 (`Actb`) is at or above 2^24"),
        "{err}"
    );
}

/// The same file given twice, and repeated cell names, are named in warnings; the shards'
/// cell names are made unique as anndata's `obs_names_make_unique` makes them.
#[test]
fn repeated_cell_names_are_made_unique_as_anndata_does() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.csv"),
        "cell,Actb,Gapdh\nx,1,2\nx,3,1\nx-1,2,2\n",
    )
    .unwrap();
    let o = scfm(&["prepare", "a.csv", "a.csv", "--out", "p"], dir.path());
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("this input has the same contents as an earlier one"),
        "{err}"
    );
    assert!(
        err.contains("4 cells repeat the name of an earlier cell (e.g. `x`)"),
        "{err}"
    );
    let shard = read_h5ad(
        &dir.path().join("p/shards/shard-000000.h5ad"),
        &H5adOptions::default(),
    )
    .unwrap();
    // anndata: AnnData(obs_names=[x, x, x-1, x, x, x-1]).obs_names_make_unique()
    assert_eq!(shard.obs_names, ["x", "x-2", "x-1", "x-3", "x-4", "x-1-1"]);
}
