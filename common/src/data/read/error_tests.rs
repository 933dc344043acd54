//! Bad inputs: every message names the file and the element, line or value at fault.

use std::path::{Path, PathBuf};

use super::*;
use crate::testutil::repo_root;

/// The error of reading `path` with `opts`, checked to name the file (its last component).
fn err(path: &Path, opts: &ReadOptions) -> String {
    let e = read_any(path, opts)
        .expect_err(&path.display().to_string())
        .to_string();
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(e.contains(&*name), "error does not name {name}: {e}");
    e
}

fn expect(e: &str, part: &str) {
    assert!(e.contains(part), "expected `{part}` in: {e}");
}

/// Writes a scratch HDF5 file with one dataset `foo/bar`.
fn other_h5(path: &Path) {
    let f = hdf5::File::create(path).unwrap();
    f.create_group("foo")
        .unwrap()
        .new_dataset_builder()
        .with_data(&[1i32, 2, 3])
        .create("bar")
        .unwrap();
}

#[test]
fn hdf5_errors_name_file_and_element() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let def = ReadOptions::default();
    let other = d.join("other.h5");
    other_h5(&other);
    let e = detect_format(&other).unwrap_err().to_string();
    expect(&e, "HDF5 file of unknown layout");
    expect(&e, "top-level members: foo");
    let e = super::super::tenx::read_tenx_h5(&other, &def)
        .unwrap_err()
        .to_string();
    expect(&e, "other.h5");
    expect(
        &e,
        "not a 10x Genomics HDF5 file: no `matrix` group and no genome group",
    );
    let h5ad = repo_root().join("data/mouse10k.h5ad");
    let e = super::super::tenx::read_tenx_h5(&h5ad, &def)
        .unwrap_err()
        .to_string();
    expect(&e, "not a 10x Genomics HDF5 file");
    let v3 = repo_root().join("data/10x_v3.h5");
    let e = super::super::loom::read_loom(&v3, &def)
        .unwrap_err()
        .to_string();
    expect(
        &e,
        "no `matrix` dataset: not a loom file (top-level members: matrix)",
    );

    let multi =
        repo_root().join(".cache/scanpy-1.11.5/tests/_data/10x_data/1.2.0/multiple_genomes.h5");
    expect(
        &err(&multi, &def),
        "several genomes (another_genome, hg19_chr21); choose one with the genome option",
    );
    let mm10 = ReadOptions {
        genome: Some("mm10".into()),
        ..ReadOptions::default()
    };
    expect(
        &err(&multi, &mm10),
        "no genome `mm10` in file (genomes: another_genome, hg19_chr21)",
    );
    expect(
        &err(&v3, &mm10),
        "no genome `mm10` in `matrix/features/genome` (genomes: GRCh38_chr21)",
    );
    let custom = ReadOptions {
        feature_type: Some("Custom".into()),
        ..ReadOptions::default()
    };
    expect(
        &err(&v3, &custom),
        "no features of type `Custom` in `matrix/features/feature_type` (types: Gene Expression)",
    );

    let text_h5 = d.join("text.h5");
    std::fs::write(&text_h5, "just text\n").unwrap();
    expect(&err(&text_h5, &def), "not an HDF5 file");
}

/// A copy of scanpy's CellRanger 1.2.0 mtx folder in `dir/name`, with `matrix.mtx`
/// changed by `edit`.
fn mtx_copy(dir: &Path, name: &str, edit: impl FnOnce(&str) -> String) -> PathBuf {
    let src = repo_root().join(
        ".cache/scanpy-1.11.5/tests/_data/10x_data/1.2.0/filtered_gene_bc_matrices/hg19_chr21",
    );
    let dst = dir.join(name);
    std::fs::create_dir(&dst).unwrap();
    for f in ["genes.tsv", "barcodes.tsv"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let m = std::fs::read_to_string(src.join("matrix.mtx")).unwrap();
    std::fs::write(dst.join("matrix.mtx"), edit(&m)).unwrap();
    dst
}

#[test]
fn mtx_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let def = ReadOptions::default();
    let lines = |m: &str, keep: usize| -> String {
        m.lines().take(keep).map(|l| format!("{l}\n")).collect()
    };
    // 3 header lines and 12 entries: keep 9 entries.
    let cut = mtx_copy(d, "cut", |m| lines(m, 12));
    let e = err(&cut.join("matrix.mtx"), &def);
    expect(&e, "line 13: file ends after 9 of 12 entries (truncated?)");
    let array = mtx_copy(d, "array", |m| m.replacen("coordinate", "array", 1));
    expect(
        &err(&array, &def),
        "line 1: expected `%%MatrixMarket matrix coordinate integer|real|pattern general`",
    );
    let bad = mtx_copy(d, "bad", |m| {
        let mut l: Vec<&str> = m.lines().collect();
        l[5] = "201 x 1";
        l.join("\n")
    });
    expect(
        &err(&bad, &def),
        "line 6: column (cell) index `x` is not in 1..=12",
    );
    let size = mtx_copy(d, "size", |m| m.replacen("343 12 12", "343 13 12", 1));
    expect(
        &err(&size, &def),
        "line 3: matrix is 343 × 13, but the folder lists 343 features and 12 barcodes",
    );
    let nobar = mtx_copy(d, "nobar", |m| m.to_owned());
    std::fs::remove_file(nobar.join("barcodes.tsv")).unwrap();
    expect(
        &err(&nobar, &def),
        "10x mtx folder without barcodes.tsv or barcodes.tsv.gz",
    );
    // A truncated gzip stream.
    let gz = mtx_copy(d, "gz", |m| m.to_owned());
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, &std::fs::read(gz.join("matrix.mtx")).unwrap()).unwrap();
    let bytes = enc.finish().unwrap();
    std::fs::remove_file(gz.join("matrix.mtx")).unwrap();
    std::fs::write(gz.join("matrix.mtx.gz"), &bytes[..bytes.len() / 2]).unwrap();
    expect(&err(&gz.join("matrix.mtx.gz"), &def), "I/O error on");
}

#[test]
fn csv_and_detection_errors_name_file_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let def = ReadOptions::default();
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let csv = write("bad.csv", ",g1,g2,g3\nc1,0,1,2\nc2,1,2,abc\n");
    expect(
        &err(&csv, &def),
        "line 3, column 4 (row `c2`, column `g3`): non-numeric value `abc`",
    );
    let ragged = write("ragged.tsv", "\tg1\tg2\nc1\t0\t1\nc2\t1\n");
    expect(
        &err(&ragged, &def),
        "line 3: 2 fields, expected 3 (a name and 2 values",
    );
    let empty = write("empty.csv", ",g1\nc1,\n");
    expect(
        &err(&empty, &def),
        "line 2, column 2 (row `c1`, column `g1`): empty value ``",
    );
    let nan = write("nan.csv", ",g1\nc1,nan\n");
    expect(&err(&nan, &def), "non-finite value `nan`");
    // A header without corner cell, quoted names, CRLF line ends, and comment lines.
    let ok = write(
        "ok.csv",
        "# made by hand\r\n\"g,1\",g2\r\nc1,0,2.5\r\n\"c\"\"2\",1e1,0\r\n",
    );
    let ds = read_any(&ok, &def).unwrap();
    assert_eq!(ds.var_names, ["g,1", "g2"]);
    assert_eq!(ds.obs_names, ["c1", "c\"2"]);
    assert_eq!(
        (ds.x.indptr, ds.x.indices, ds.x.data),
        (vec![0, 1, 2], vec![1, 0], vec![2.5, 10.0])
    );

    let xyz = write("data.xyz", "a,b\n1,2\n");
    expect(
        &detect_format(&xyz).unwrap_err().to_string(),
        "cannot tell the file format from extension `xyz`",
    );
    expect(&err(&xyz, &def), "cannot tell the file format");
    expect(&err(&d.join("missing.csv"), &def), "I/O error on");
    expect(
        &detect_format(d).unwrap_err().to_string(),
        "directory without matrix.mtx or matrix.mtx.gz",
    );
}
