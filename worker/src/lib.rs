//! `scfm-worker`: the part of scfm that links libtorch — the model, the optimizer, the
//! trainer, checkpoints, the PyTorch reference export and the benchmark.

pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod dist;
pub mod error;
pub mod infer;
pub mod libtorch;
pub mod model;
pub mod optim;
pub mod params;
pub mod preempt;
pub mod step;
pub mod trainer;
pub mod upload;
pub mod versions;

pub use error::{Result, WorkerError};
pub mod bench;
pub mod bench_device;
pub mod bench_embed;
pub mod reference;
