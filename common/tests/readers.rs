//! The 10x readers through the public API, built without `cfg(test)` (production block
//! sizes), on the repository's real data. Value-by-value comparisons with scanpy are the
//! unit tests in `src/data/read/tests.rs`.

use std::path::{Path, PathBuf};

use scfm_common::data::read::{InputFormat, ReadOptions, detect_format, read_any};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn tenx_h5_and_mtx_read_the_same_counts() {
    let opts = ReadOptions::default();
    let h5 = root().join("data/10x_v3.h5");
    assert_eq!(detect_format(&h5).unwrap(), InputFormat::TenxH5);
    let ds = read_any(&h5, &opts).unwrap();
    assert_eq!((ds.x.n_rows, ds.x.n_cols, ds.x.nnz()), (1107, 507, 23_866));
    // Totals from scanpy: X.data.sum() in float64, X.indices.sum() after sort_indices().
    let total: f64 = ds.x.data.iter().map(|&v| f64::from(v)).sum();
    assert_eq!(total, 41_549.0);
    let index_sum: u64 = ds.x.indices.iter().map(|&i| u64::from(i)).sum();
    assert_eq!(index_sum, 7_345_623);
    assert_eq!(ds.obs_names[0], "AAACCCAAGGAGAGTA-1");
    assert_eq!(ds.var_names[506], "PRMT2");

    // scanpy's CellRanger 3.0.0 mtx folder holds the same matrix.
    let mtx =
        root().join(".cache/scanpy-1.11.5/tests/_data/10x_data/3.0.0/filtered_feature_bc_matrix");
    assert_eq!(detect_format(&mtx).unwrap(), InputFormat::Mtx);
    let m = read_any(&mtx, &opts).unwrap();
    assert_eq!(m.x, ds.x);
    assert_eq!((m.obs_names, m.var_names), (ds.obs_names, ds.var_names));

    let v2 = read_any(&root().join("data/10x_v2.h5"), &opts).unwrap();
    assert_eq!((v2.x.n_rows, v2.x.n_cols, v2.x.nnz()), (12, 343, 12));
    assert_eq!(v2.var_names[342], "S100B");
}
