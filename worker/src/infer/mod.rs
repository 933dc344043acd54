//! Using a trained model: loading it for inference, matching an input's genes to its
//! vocabulary, cell embeddings (`scfm embed`) and evaluation against baselines
//! (`scfm evaluate`).

pub mod align;
pub mod dump;
pub mod embed;
pub mod evaluate;
pub mod export;
pub mod input;
pub mod load;
pub mod parts;
pub mod pca;
pub mod recon;
pub mod run;
pub mod shards;

pub use align::{GeneAlignment, align};
pub use embed::Embedder;
pub use load::ModelBundle;
