//! Background checkpoint uploads: training goes on while a checkpoint is stored.
//!
//! The training thread only takes a [`Snapshot`] (shallow tensor handles, no copy); the
//! upload thread serializes it while the next step's forward and backward run, and the
//! trainer waits for that ([`Uploader::wait_snapshot`]) before its next optimizer update
//! changes the tensors. So a checkpoint costs the training thread nothing unless encoding
//! takes longer than a forward + backward.
//!
//! At most one upload is in flight: starting the next one first waits for the previous
//! one. An upload stores the parts (read back and verified), `state.json`, then
//! `latest.json`, then the metrics log's new lines and retention — so if it fails (after the store's
//! retries), `latest.json` still names the previous checkpoint.

use std::thread::JoinHandle;
use std::time::Instant;

use scfm_common::metrics_log::MetricsLog;
use scfm_common::storage::Store;

use crate::checkpoint::{self, Snapshot};
use crate::error::{Result, WorkerError};

/// What to do after the checkpoint is current.
#[derive(Debug, Clone)]
pub struct AfterUpload {
    /// The metrics log whose pending lines are written next to the checkpoints
    /// (single-process runs).
    pub metrics: Option<std::sync::Arc<MetricsLog>>,
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
    /// Disconnected once the snapshot in flight is encoded.
    encoding: Option<std::sync::mpsc::Receiver<()>>,
}

impl Uploader {
    /// An idle uploader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until the snapshot in flight is encoded (its tensors may change after);
    /// returns the seconds waited.
    pub fn wait_snapshot(&mut self) -> f64 {
        let Some(rx) = self.encoding.take() else {
            return 0.0;
        };
        let t = Instant::now();
        let _ = rx.recv();
        t.elapsed().as_secs_f64()
    }

    /// Waits for the upload in flight, if any, and returns its outcome.
    pub fn wait(&mut self) -> Option<Result<Uploaded>> {
        self.wait_snapshot();
        let h = self.inflight.take()?;
        Some(h.join().unwrap_or_else(|_| {
            Err(WorkerError::Internal(
                "checkpoint upload thread panicked".into(),
            ))
        }))
    }

    /// Starts encoding and uploading `snap` (after waiting for the previous upload, whose
    /// outcome is returned). Its tensors must not change before [`Uploader::wait_snapshot`]
    /// (or [`Uploader::wait`]) returned.
    pub fn start(
        &mut self,
        store: Store,
        snap: Snapshot,
        after: AfterUpload,
    ) -> Option<Result<Uploaded>> {
        let previous = self.wait();
        let (done, encoding) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("scfm-ckpt-upload".into())
            .spawn(move || {
                let t = Instant::now();
                let enc = snap.encode();
                // Training may change the tensors from here on.
                drop(snap);
                drop(done);
                let enc = enc?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| WorkerError::Internal(e.to_string()))?;
                rt.block_on(async {
                    let dir = checkpoint::upload(&store, &enc).await?;
                    if let Some(m) = after.metrics {
                        m.flush().await?;
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
            Ok(h) => {
                self.inflight = Some(h);
                self.encoding = Some(encoding);
            }
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
