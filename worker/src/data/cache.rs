//! Shards of a prepared dataset made local and verified before anything reads them.
//!
//! A shard in a local store is read in place; one in a remote store is downloaded into
//! the cache directory under its SHA-256 (so runs and datasets share identical shards).
//! Either way its SHA-256 must equal `dataset.json`'s before it is used: a corrupt
//! download is fetched once more, and a shard that still fails (or a damaged local file)
//! is an error naming it — training never sees its cells.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use scfm_common::data::prepared::ShardInfo;
use scfm_common::runtime::Rt;
use scfm_common::storage::{Store, sha256_hex};
use sha2::{Digest, Sha256};

use crate::error::{Result, WorkerError};

/// Verified local copies of a dataset's shards.
pub struct ShardCache {
    store: Store,
    shards: Vec<ShardInfo>,
    dir: PathBuf,
    ready: Vec<Mutex<Option<PathBuf>>>,
    /// The process's runtime, which downloads block on (from plain threads).
    rt: Rt,
}

impl ShardCache {
    /// A cache for `shards` of `store`, downloading remote shards into `dir` on `rt`.
    pub fn new(store: Store, shards: Vec<ShardInfo>, dir: &Path, rt: Rt) -> ShardCache {
        let ready = shards.iter().map(|_| Mutex::new(None)).collect();
        ShardCache {
            store,
            shards,
            dir: dir.to_path_buf(),
            ready,
            rt,
        }
    }

    /// The verified local file of shard `s` (fetching and verifying it the first time).
    pub fn ensure(&self, s: u32) -> Result<PathBuf> {
        let info = self.shards.get(s as usize).ok_or_else(|| {
            WorkerError::Internal(format!(
                "shard {s} requested, the dataset has {}",
                self.shards.len()
            ))
        })?;
        let mut slot = self.ready[s as usize].lock().expect("shard slot");
        if let Some(p) = &*slot {
            return Ok(p.clone());
        }
        let url = self.store.url_of(&info.path);
        let path = match self.store.local_path(&info.path) {
            Some(local) => {
                verify_file(&local, info, &url)?;
                local
            }
            None => self.download(info, &url)?,
        };
        tracing::debug!(shard = %url, "shard verified");
        *slot = Some(path.clone());
        Ok(path)
    }

    /// Verifies (and fetches) shards in `order` on a background thread; failures are left
    /// for [`ShardCache::ensure`] to report when the shard is needed.
    pub fn prefetch(self: &Arc<Self>, order: Vec<u32>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("scfm-shard-prefetch".into())
            .spawn(move || {
                for s in order {
                    if let Err(e) = me.ensure(s) {
                        tracing::debug!(shard = s, error = %e, "prefetch failed");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the shard prefetch thread");
        }
    }

    fn download(&self, info: &ShardInfo, url: &str) -> Result<PathBuf> {
        let dst = self.dir.join(format!("{}.h5ad", info.sha256));
        if dst.is_file() && verify_file(&dst, info, url).is_ok() {
            return Ok(dst);
        }
        let io = |e: std::io::Error| WorkerError::Data(format!("{}: {e}", self.dir.display()));
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let rt = &self.rt;
        let mut last = String::new();
        for attempt in 1..=2 {
            let bytes = rt.block_on(self.store.get(&info.path))?;
            let sha = sha256_hex(&bytes);
            if sha == info.sha256 {
                let tmp = dst.with_extension(format!("tmp-{}", std::process::id()));
                let written =
                    std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &dst));
                if let Err(e) = written {
                    // Nothing partial stays in the cache (a full disk gets its space back).
                    let _ = std::fs::remove_file(&tmp);
                    return Err(WorkerError::Data(format!(
                        "caching shard {url} as {}: {e}",
                        dst.display()
                    )));
                }
                return Ok(dst);
            }
            last = format!("sha256 {sha} ({} bytes)", bytes.len());
            tracing::warn!(shard = %url, attempt, got = %last, "downloaded shard failed verification");
        }
        Err(corrupt(url, info, &last))
    }
}

fn corrupt(url: &str, info: &ShardInfo, got: &str) -> WorkerError {
    WorkerError::Common(scfm_common::Error::Corrupt {
        url: url.to_string(),
        message: format!(
            "{got}, but dataset.json lists sha256 {} ({} bytes): the shard is damaged or was \
             replaced; its cells are not used (run `scfm prepare` again)",
            info.sha256, info.bytes
        ),
    })
}

/// Checks a local file's size and SHA-256 against `info`.
fn verify_file(path: &Path, info: &ShardInfo, url: &str) -> Result<()> {
    let io = |e: std::io::Error| WorkerError::Data(format!("{url}: {e}"));
    let mut f = std::fs::File::open(path).map_err(io)?;
    let (mut h, mut n) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = f.read(&mut buf).map_err(io)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let sha = hex::encode(h.finalize());
    if sha != info.sha256 {
        return Err(corrupt(url, info, &format!("sha256 {sha} ({n} bytes)")));
    }
    Ok(())
}
