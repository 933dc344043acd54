//! Tests of the `.h5ad` writer: files written from the repository's real data are read back
//! by Python anndata (the reference) and by the crate's reader and compared value by value.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::data::CellDataset;
use crate::data::h5ad::{H5adOptions, MatrixSource, read_h5ad};
use crate::storage::sha256_hex;
use crate::testutil::{python, read_bin, repo_root, same};

/// Reads each `{"file", "out"}` of `argv[1]` (JSON) with anndata and dumps to `out`: X as
/// CSR binaries (indptr u64, indices u32, data f32, little-endian) and meta.json (names,
/// columns as strings, dtypes, and the HDF5 layout of the X datasets).
const DUMP: &str = r#"
import json, sys, warnings
import anndata as ad, h5py, numpy as np, scipy.sparse as sp
warnings.simplefilter("ignore")
for job in json.loads(sys.argv[1]):
    a, out = ad.read_h5ad(job["file"]), job["out"]
    X = a.X
    assert sp.issparse(X) and X.format == "csr", type(X)
    assert X.dtype == np.float32, X.dtype
    X.indptr.astype("<u8").tofile(out + "/indptr.bin")
    X.indices.astype("<u4").tofile(out + "/indices.bin")
    X.data.astype("<f4").tofile(out + "/data.bin")
    cols = lambda df: {c: [str(v) for v in df[c]] for c in df.columns}
    meta = {"shape": list(X.shape), "obs_names": list(a.obs_names), "var_names": list(a.var_names),
            "obs": cols(a.obs), "var": cols(a.var), "obs_order": list(a.obs.columns),
            "var_order": list(a.var.columns),
            "obs_dtypes": {c: str(a.obs[c].dtype) for c in a.obs.columns},
            "categories": {c: list(a.obs[c].cat.categories) for c in a.obs.columns},
            "ordered": [bool(a.obs[c].cat.ordered) for c in a.obs.columns]}
    with h5py.File(job["file"]) as f:
        meta["root"] = [str(f.attrs["encoding-type"]), str(f.attrs["encoding-version"])]
        meta["x_shape_attr"] = [int(v) for v in f["X"].attrs["shape"]]
        meta["layout"] = {k: [f[k].compression, f[k].compression_opts, f[k].chunks, str(f[k].dtype), f[k].shuffle]
                          for k in ["X/data", "X/indices", "X/indptr"]}
        meta["codes"] = {c: str(f["obs"][c]["codes"].dtype) for c in a.obs.columns}
        meta["dicts"] = [str(f[k].attrs["encoding-type"]) for k in ["obsm", "varm", "obsp", "varp", "layers", "uns"]]
    json.dump(meta, open(out + "/meta.json", "w"))
"#;

/// Runs [`DUMP`] on `jobs` (file, output dir) with a timeout of two minutes.
fn dump(jobs: &[(PathBuf, PathBuf)]) {
    let spec: Vec<Value> = jobs
        .iter()
        .map(|(f, o)| json!({"file": f, "out": o}))
        .collect();
    let mut child = Command::new(python())
        .args(["-c", DUMP, &Value::from(spec).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run SCFM_PYTHON");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("anndata dump timed out");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "anndata dump failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A shard's owned contents.
struct Shard {
    ds: CellDataset,
    var_cols: Vec<(&'static str, Vec<String>)>,
    obs_cols: Vec<(&'static str, Vec<String>)>,
}

impl Shard {
    fn write(&self, path: &Path, opts: &WriteOptions) -> Result<()> {
        let var: Vec<(&str, &[String])> = self.var_cols.iter().map(|(n, v)| (*n, &v[..])).collect();
        let obs: Vec<(&str, &[String])> = self.obs_cols.iter().map(|(n, v)| (*n, &v[..])).collect();
        let c = ShardContents {
            x: &self.ds.x,
            obs_names: &self.ds.obs_names,
            var_names: &self.ds.var_names,
            var_columns: &var,
            obs_columns: &obs,
        };
        write_h5ad(path, &c, opts)
    }
}

/// mouse10k with a real var column, a 3-valued obs column with a non-ASCII value and an
/// obs column with one category per cell (int16 codes).
fn mouse10k() -> Shard {
    let ds = read_h5ad(
        &repo_root().join("data/mouse10k.h5ad"),
        &H5adOptions::default(),
    )
    .unwrap();
    let n = ds.x.n_rows;
    let symbols = ds.var_names.iter().map(|g| format!("sym-{g}")).collect();
    let batch = (0..n)
        .map(|i| ["b0", "Zelle ä", "b2"][i % 3].to_owned())
        .collect();
    let cell = ds.obs_names.clone();
    Shard {
        ds,
        var_cols: vec![("gene_symbols", symbols)],
        obs_cols: vec![("source", batch), ("cell", cell)],
    }
}

/// pbmc68k_reduced's raw counts with its real cell-type labels as an obs column.
fn pbmc_raw() -> Shard {
    let opts = H5adOptions {
        source: MatrixSource::Raw,
        label_column: Some("bulk_labels".into()),
    };
    let mut ds = read_h5ad(&repo_root().join("data/pbmc68k_reduced.h5ad"), &opts).unwrap();
    let labels = ds.labels.take().unwrap();
    Shard {
        ds,
        var_cols: vec![],
        obs_cols: vec![("source", labels)],
    }
}

/// An empty `n_rows` × `n_cols` shard with one column each.
fn empty(n_rows: usize, n_cols: usize) -> Shard {
    let names = |p: &str, n: usize| (0..n).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    Shard {
        ds: CellDataset {
            x: CsrMatrix::from_dense(n_rows, n_cols, &vec![0.0; n_rows * n_cols]),
            obs_names: names("c", n_rows),
            var_names: names("g", n_cols),
            labels: None,
        },
        var_cols: vec![("gene_symbols", names("s", n_cols))],
        obs_cols: vec![("source", names("x", n_rows))],
    }
}

/// Compares what anndata read (dumped in `out`) and what the crate reads with `s`.
fn check(s: &Shard, file: &Path, out: &Path, codec: Codec) {
    let what = format!("{} ({codec:?})", file.display());
    let meta: Value =
        serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let x = &s.ds.x;
    assert_eq!(meta["shape"], json!([x.n_rows, x.n_cols]), "{what}: shape");
    assert_eq!(
        meta["x_shape_attr"],
        json!([x.n_rows, x.n_cols]),
        "{what}: shape attr"
    );
    assert_eq!(
        strs(&meta["obs_names"]),
        s.ds.obs_names,
        "{what}: obs names"
    );
    assert_eq!(
        strs(&meta["var_names"]),
        s.ds.var_names,
        "{what}: var names"
    );
    same(
        &what,
        "indptr",
        &x.indptr,
        &read_bin(&out.join("indptr.bin"), u64::from_le_bytes),
    );
    same(
        &what,
        "indices",
        &x.indices,
        &read_bin(&out.join("indices.bin"), u32::from_le_bytes),
    );
    let bits: Vec<u32> = x.data.iter().map(|v| v.to_bits()).collect();
    same(
        &what,
        "data bits",
        &bits,
        &read_bin(&out.join("data.bin"), u32::from_le_bytes),
    );
    for (frame, cols) in [("obs", &s.obs_cols), ("var", &s.var_cols)] {
        let order: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            strs(&meta[format!("{frame}_order")]),
            order,
            "{what}: {frame} columns"
        );
        for (name, values) in cols.iter() {
            assert_eq!(&strs(&meta[frame][name]), values, "{what}: {frame}/{name}");
        }
    }
    for (name, values) in &s.obs_cols {
        assert_eq!(
            meta["obs_dtypes"][name], "category",
            "{what}: obs/{name} dtype"
        );
        let mut cats = values.clone();
        cats.sort();
        cats.dedup();
        assert_eq!(
            strs(&meta["categories"][name]),
            cats,
            "{what}: obs/{name} categories"
        );
        let codes = if cats.len() < 127 { "int8" } else { "int16" };
        assert_eq!(meta["codes"][name], codes, "{what}: obs/{name} codes");
    }
    assert!(
        meta["ordered"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o == false)
    );
    assert_eq!(meta["root"], json!(["anndata", "0.1.0"]), "{what}");
    assert_eq!(meta["dicts"], json!(vec!["dict"; 6]), "{what}");
    let layout = &meta["layout"];
    let dtypes = ["float32", "int32", "int64"];
    let chunk_values = WriteOptions::default().chunk_bytes / 4;
    for (k, name) in ["X/data", "X/indices", "X/indptr"].iter().enumerate() {
        let l = &layout[name];
        let n = if k == 2 { x.n_rows + 1 } else { x.nnz() };
        // int64 `indptr` chunks hold half as many values.
        let chunk = (chunk_values >> (k / 2)).min(n);
        let expect = match codec {
            _ if n == 0 => json!([null, null, null]),
            Codec::None => json!([null, null, null]),
            Codec::Lzf => json!(["lzf", null, [chunk]]),
            Codec::Gzip => json!(["gzip", 4, [chunk]]),
        };
        let shuffled = n > 0 && codec != Codec::None;
        assert_eq!(l[4], json!(shuffled), "{what}: {name} shuffle");
        assert_eq!(
            l.as_array().unwrap()[..3],
            expect.as_array().unwrap()[..],
            "{what}: {name}"
        );
        assert_eq!(l[3], dtypes[k], "{what}: {name} dtype");
    }

    // The crate's own reader, with the first obs column as labels.
    let opts = H5adOptions {
        source: MatrixSource::X,
        label_column: s.obs_cols.first().map(|(n, _)| n.to_string()),
    };
    let back = read_h5ad(file, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(back.x == s.ds.x, "{what}: matrix read back differs");
    assert_eq!(back.obs_names, s.ds.obs_names, "{what}");
    assert_eq!(back.var_names, s.ds.var_names, "{what}");
    assert_eq!(
        back.labels.as_ref(),
        s.obs_cols.first().map(|c| &c.1),
        "{what}"
    );
}

fn opts(codec: Codec) -> WriteOptions {
    WriteOptions {
        codec,
        ..WriteOptions::default()
    }
}

/// Writes each shard with each codec, then compares with anndata and the crate's reader.
fn roundtrip(shards: &[(&str, Shard)], codecs: &[Codec]) {
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Vec::new();
    for (name, s) in shards {
        for &codec in codecs {
            let file = dir.path().join(format!("{name}-{codec:?}.h5ad"));
            let t = Instant::now();
            s.write(&file, &opts(codec)).unwrap();
            let size = std::fs::metadata(&file).unwrap().len();
            eprintln!(
                "{name} {codec:?}: written in {:?}, {size} bytes",
                t.elapsed()
            );
            let out = dir.path().join(format!("{name}-{codec:?}"));
            std::fs::create_dir(&out).unwrap();
            jobs.push((file, out));
        }
    }
    dump(&jobs);
    let mut k = 0;
    for (_, s) in shards {
        for &codec in codecs {
            check(s, &jobs[k].0, &jobs[k].1, codec);
            k += 1;
        }
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

const CODECS: [Codec; 3] = [Codec::None, Codec::Lzf, Codec::Gzip];

#[test]
fn real_data_matches_anndata_for_each_codec() {
    roundtrip(
        &[("mouse10k", mouse10k()), ("pbmc_raw", pbmc_raw())],
        &CODECS,
    );
}

#[test]
fn empty_matrices_match_anndata() {
    let shards = [
        ("rows0", empty(0, 5)),
        ("nnz0", empty(3, 4)),
        ("none", empty(0, 0)),
    ];
    roundtrip(&shards, &CODECS);
}

/// The file the child process of [`same_contents_give_same_bytes`] writes `codec` to.
fn child_file(out: &Path, codec: Codec) -> PathBuf {
    out.with_extension(format!("{codec:?}"))
}

/// Run by [`same_contents_give_same_bytes`] in a child process: writes other data, then
/// `pbmc_raw` with each codec.
#[test]
#[ignore = "run as a child process by same_contents_give_same_bytes"]
fn write_in_child_process() {
    let Some(out) = std::env::var_os("SCFM_WRITE_TEST_OUT").map(PathBuf::from) else {
        return;
    };
    let other = out.with_extension("other");
    mouse10k().write(&other, &opts(Codec::Lzf)).unwrap();
    for codec in CODECS {
        pbmc_raw()
            .write(&child_file(&out, codec), &opts(codec))
            .unwrap();
    }
}

#[test]
fn same_contents_give_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("child.h5ad");
    let module = module_path!().split_once("::").unwrap().1;
    let st = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &format!("{module}::write_in_child_process")])
        .args(["--ignored", "--test-threads=1", "--quiet"])
        .env("SCFM_WRITE_TEST_OUT", &out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "child process failed");
    let sha = |p: &Path| sha256_hex(&std::fs::read(p).unwrap());
    let (s, other) = (pbmc_raw(), empty(3, 4));
    for codec in CODECS {
        let (a, b) = (dir.path().join("a.h5ad"), dir.path().join("b.h5ad"));
        s.write(&a, &opts(codec)).unwrap();
        // Other work in between (library and heap state), and a later second.
        other
            .write(&dir.path().join("c.h5ad"), &opts(codec))
            .unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        s.write(&b, &opts(codec)).unwrap();
        assert_eq!(sha(&a), sha(&b), "{codec:?}: two writes differ");
        let c = child_file(&out, codec);
        assert_eq!(
            sha(&a),
            sha(&c),
            "{codec:?}: the child process wrote other bytes"
        );
        // No object stores a time.
        let f = hdf5::File::open(&a).unwrap();
        let names = [
            "X",
            "X/data",
            "X/indices",
            "X/indptr",
            "obs",
            "obs/_index",
            "obs/source",
        ];
        let names = names
            .into_iter()
            .chain(["obs/source/codes", "var", "var/_index", "uns"]);
        for name in std::iter::once(".").chain(names) {
            let i = f.loc_info_by_name(name).unwrap();
            assert_eq!(
                (i.atime, i.mtime, i.ctime, i.btime),
                (0, 0, 0, 0),
                "{codec:?}: {name}"
            );
        }
    }
}

#[test]
fn errors_name_the_path_and_leave_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = empty(3, 4);
    let missing = dir.path().join("no/such/dir/shard.h5ad");
    let e = s
        .write(&missing, &WriteOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");

    // Renaming onto a directory fails after the file was written: the temporary goes.
    let taken = dir.path().join("taken.h5ad");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("keep"), "x").unwrap();
    let e = s
        .write(&taken, &WriteOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&taken.display().to_string()), "{e}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("taken.h5ad")]);

    // Contents that do not fit the matrix.
    let mut bad = empty(3, 4);
    bad.ds.obs_names.pop();
    let e = bad
        .write(&dir.path().join("x.h5ad"), &WriteOptions::default())
        .unwrap_err();
    assert!(
        e.to_string().contains("2 obs names for a 3 × 4 matrix"),
        "{e}"
    );
    let mut bad = empty(3, 4);
    bad.obs_cols.push(("source", vec![String::new(); 3]));
    let e = bad
        .write(&dir.path().join("x.h5ad"), &WriteOptions::default())
        .unwrap_err();
    assert!(
        e.to_string().contains("obs column `source` given twice"),
        "{e}"
    );
    let mut bad = empty(3, 4);
    bad.var_cols[0].1[1] = "a\0b".into();
    let e = bad
        .write(&dir.path().join("x.h5ad"), &WriteOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("value 1 contains a NUL"), "{e}");
    assert!(!dir.path().join("x.h5ad").exists());
}

#[test]
fn codec_names_in_configs() {
    let c: Vec<Codec> = serde_json::from_str(r#"["none", "lzf", "gzip"]"#).unwrap();
    assert_eq!(c, CODECS);
    assert_eq!(Codec::default(), Codec::Lzf);
}
