//! Background checkpoint uploads: training goes on while a checkpoint is stored.
//!
//! At most one upload is in flight: starting the next one first waits for the previous
//! one. An upload stores the parts (read back and verified), `state.json`, then
//! `latest.json`, then the metrics log and retention — so if it fails (after the store's
//! retries), `latest.json` still names the previous checkpoint.

use std::thread::JoinHandle;
use std::time::Instant;

use scfm_common::checkpoint::METRICS;
use scfm_common::storage::Store;

use crate::checkpoint::{self, Encoded};
use crate::error::{Result, WorkerError};

/// What to do after the checkpoint is current.
#[derive(Debug, Clone)]
pub struct AfterUpload {
    /// The metrics log to store next to the checkpoints (single-process runs).
    pub metrics: Option<String>,
    /// Checkpoints to keep (newest).
    pub keep_last: usize,
    /// A checkpoint directory to keep besides them (the best).
    pub keep_also: Option<String>,
}

/// The outcome of one upload.
#[derive(Debug)]
pub struct Uploaded {
    /// Checkpoint directory key.
    pub dir: String,
    /// Step.
    pub step: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Runs checkpoint uploads on a background thread, one at a time.
#[derive(Default)]
pub struct Uploader {
    inflight: Option<JoinHandle<Result<Uploaded>>>,
}

impl Uploader {
    /// An idle uploader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for the upload in flight, if any, and returns its outcome.
    pub fn wait(&mut self) -> Option<Result<Uploaded>> {
        let h = self.inflight.take()?;
        Some(h.join().unwrap_or_else(|_| {
            Err(WorkerError::Internal(
                "checkpoint upload thread panicked".into(),
            ))
        }))
    }

    /// Starts uploading `enc` (after waiting for the previous upload, whose outcome is
    /// returned).
    pub fn start(
        &mut self,
        store: Store,
        enc: Encoded,
        after: AfterUpload,
    ) -> Option<Result<Uploaded>> {
        let previous = self.wait();
        let handle = std::thread::Builder::new()
            .name("scfm-ckpt-upload".into())
            .spawn(move || {
                let t = Instant::now();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| WorkerError::Internal(e.to_string()))?;
                rt.block_on(async {
                    let dir = checkpoint::upload(&store, &enc).await?;
                    if let Some(m) = after.metrics {
                        store.put(METRICS, m.into()).await?;
                    }
                    checkpoint::retain(&store, after.keep_last, after.keep_also.as_deref())
                        .await?;
                    tracing::info!(step = enc.state.step, url = %store.url_of(&dir), seconds = t.elapsed().as_secs_f64(), "checkpoint saved");
                    Ok(Uploaded {
                        dir,
                        step: enc.state.step,
                        seconds: t.elapsed().as_secs_f64(),
                    })
                })
            });
        match handle {
            Ok(h) => self.inflight = Some(h),
            Err(e) => {
                return Some(Err(WorkerError::Internal(format!(
                    "cannot start the upload thread: {e}"
                ))));
            }
        }
        previous
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        if let Some(Err(e)) = self.wait() {
            tracing::error!(error = %e, "checkpoint upload failed; the previous checkpoint stays current");
        }
    }
}
