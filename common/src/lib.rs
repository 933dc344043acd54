//! `scfm-common`: the parts of scfm shared by the coordinator and the workers —
//! configuration types and presets, single-cell data formats, preprocessing, the
//! tokenizer, object storage and deterministic random numbers. No libtorch here.

pub mod alloc;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod manifest;
pub mod metrics_log;
pub mod rng;
pub mod rpc;
pub mod runtime;
pub mod storage;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod testutil;
pub mod tokenizer;

pub use error::{Error, Result};
pub use storage::install_crypto_provider;
