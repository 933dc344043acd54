//! Single-cell data: matrices, readers and preprocessing.

pub mod csv;
pub mod h5ad;
pub mod inputs;
pub mod loom;
pub mod matrix;
pub mod mtx;
pub mod order;
pub mod prepared;
pub mod preprocess;
pub mod read;
pub mod tenx;

pub use matrix::CsrMatrix;

/// A cells × genes count matrix with its cell and gene names, as read from a file.
#[derive(Debug, Clone)]
pub struct CellDataset {
    /// Values, cells × genes.
    pub x: CsrMatrix,
    /// Cell identifiers (obs names), one per row.
    pub obs_names: Vec<String>,
    /// Gene identifiers (var names), one per column.
    pub var_names: Vec<String>,
    /// Optional per-cell labels (e.g. cell type), when the reader was asked for a column.
    pub labels: Option<Vec<String>>,
}
