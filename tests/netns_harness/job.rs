//! Job manifests for a [`Net`]: the coordinator listens on its host's address, the job
//! has the harness's token, and the data is the demo dataset prepared as the other
//! cluster tests prepare it.

use std::path::{Path, PathBuf};

use super::Net;
use super::procs::TOKEN;

/// Writes `job.yaml` in `dir` for a job whose coordinator runs in host `coordinator`:
/// `model`, `training` and `cluster` are the indented lines of those sections (`cluster`
/// sets every timeout it needs; the address and the token are added here), checkpoints
/// every `every_steps` steps at `dir/ckpt`. Returns the checkpoint dir and the manifest.
pub fn write_job(
    dir: &Path,
    net: &Net,
    coordinator: usize,
    model: &str,
    training: &str,
    cluster: &str,
    every_steps: u64,
) -> (PathBuf, PathBuf) {
    let ckpt = dir.join("ckpt");
    let m = format!(
        "run_id: netns\ndata:\n  path: {data}\n  validation_fraction: 0.05\nmodel:\n{model}\n\
         training:\n{training}\ncluster:\n  coordinator: '{ip}:0'\n{cluster}\n\
         checkpoint:\n  url: {ckpt}\n  every_steps: {every_steps}\nauth:\n  token: {TOKEN}\n",
        data = crate::prepared_dataset(dir).display(),
        ip = net.host(coordinator).ip,
        ckpt = ckpt.display(),
    );
    let path = dir.join("job.yaml");
    std::fs::write(&path, m).expect("write the manifest");
    (ckpt, path)
}
