//! Single-cell data: matrices, readers and preprocessing.

pub mod h5ad;
pub mod matrix;
pub mod preprocess;

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
