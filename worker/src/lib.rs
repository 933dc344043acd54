//! `scfm-worker`: the part of scfm that links libtorch — the model, the optimizer, the
//! trainer, checkpoints, the PyTorch reference export and the benchmark.

pub mod checkpoint;
pub mod collective;
pub mod control;
pub mod data;
pub mod dist;
pub mod error;
pub mod fence;
pub mod infer;
pub mod libtorch;
pub mod model;
pub mod optim;
pub mod overlap;
pub mod params;
pub mod step;
pub mod trainer;
pub mod upload;
pub mod versions;

pub use control::Control;
pub use error::{Result, WorkerError};
pub use scfm_common::runtime::Rt;
pub mod bench;
pub mod bench_device;
pub mod bench_embed;
pub mod bench_protocol;
pub mod reference;

#[cfg(test)]
mod tests {
    /// The worker builds no tokio runtime of its own: its binary builds one
    /// ([`scfm_common::runtime::Rt::new`]) and passes it down.
    #[test]
    fn no_runtime_is_built_in_the_worker_library() {
        let needle = concat!("runtime::", "Builder");
        let mut found = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs")
                    && std::fs::read_to_string(&p).unwrap().contains(needle)
                {
                    found.push(p.display().to_string());
                }
            }
        }
        assert!(found.is_empty(), "tokio runtimes built in {found:?}");
    }
}
