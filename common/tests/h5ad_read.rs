//! The h5ad reader through the public API, built without `cfg(test)` (production block
//! sizes), on the repository's real data. Value-by-value comparisons with Python anndata
//! are the unit tests in `src/data/h5ad/tests.rs`.

use std::path::Path;
use std::time::Instant;

use scfm_common::data::h5ad::{H5adOptions, MatrixSource, read_h5ad, read_h5ad_header};

#[test]
fn h5ad_reads_mouse10k() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mouse10k.h5ad");
    let opts = H5adOptions::default();
    let t = Instant::now();
    let ds = read_h5ad(&path, &opts).unwrap();
    eprintln!(
        "read {} cells in {:.3} s",
        ds.x.n_rows,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        (ds.x.n_rows, ds.x.n_cols, ds.x.nnz()),
        (10_000, 1000, 691_914)
    );
    // Totals from Python anndata: X.data.sum() in float64, X.indices.sum().
    let total: f64 = ds.x.data.iter().map(|&v| f64::from(v)).sum();
    assert_eq!(total, 1_597_698.0);
    assert_eq!(
        ds.x.indices.iter().map(|&i| u64::from(i)).sum::<u64>(),
        315_797_155
    );
    assert_eq!(ds.obs_names[0], "AAACCTGAGATAGGAG-1");
    assert_eq!(ds.var_names[999], "ENSMUSG00000101549");
    let (cells, genes) = read_h5ad_header(&path, &opts).unwrap();
    assert_eq!((cells, genes), (10_000, ds.var_names));
}

#[test]
fn h5ad_reads_pbmc68k_reduced_raw_with_labels() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/pbmc68k_reduced.h5ad");
    let opts = H5adOptions {
        source: MatrixSource::Raw,
        label_column: Some("bulk_labels".into()),
    };
    let ds = read_h5ad(&path, &opts).unwrap();
    assert_eq!((ds.x.n_rows, ds.x.n_cols, ds.x.nnz()), (700, 765, 174_400));
    let labels = ds.labels.unwrap();
    assert_eq!(labels[0], "CD14+ Monocyte");
    assert_eq!(ds.var_names[..3], ["HES4", "TNFRSF4", "SSU72"]);
}
