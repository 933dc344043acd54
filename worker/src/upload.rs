//! Background checkpoint uploads: training goes on while a checkpoint is stored, and
//! while the store is down.
//!
//! The training thread only takes a [`Snapshot`] (shallow tensor handles, no copy); an
//! encoder thread serializes it while the next step's forward and backward run, and the
//! trainer waits for that ([`Uploader::wait_snapshot`]) before its next optimizer update
//! changes the tensors. So a checkpoint costs the training thread nothing unless encoding
//! takes longer than a forward + backward.
//!
//! One upload thread stores the encoded checkpoints, one at a time, so two uploads (of the
//! same checkpoint or of two) never run at once. An upload stores the parts (read back and
//! verified), `state.json`, then `latest.json`, then the metrics log's new lines and retention — so if
//! it fails, `latest.json` still names the checkpoint before it. A checkpoint handed over
//! while another is being uploaded waits; a newer one supersedes it (at most two encoded
//! checkpoints are held, in spill files: the one being uploaded and the newest waiting). A failed upload
//! (each store operation was retried for the store's retry window first) is retried as a
//! whole in the background, with backoff, until it lands or a newer checkpoint supersedes
//! it; training is not held up. A failure that time does not cure (a full disk, a refused
//! credential) is not retried: the next checkpoint is the next try. [`Uploader::flush`] — the run's end, a preemption — waits
//! for the newest checkpoint to land, for at most the uploader's grace.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use scfm_common::metrics_log::MetricsLog;
use scfm_common::runtime::Rt;
use scfm_common::storage::{Backoff, Store};

use crate::checkpoint::{self, Encoded, Snapshot};
use crate::error::{Result, WorkerError};

/// The first wait before a failed checkpoint upload is tried again (doubling, with
/// jitter, up to [`MAX_REUPLOAD_WAIT`]).
const FIRST_REUPLOAD_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a failed checkpoint upload.
const MAX_REUPLOAD_WAIT: Duration = Duration::from_secs(10);
/// The retry window of the best-effort removal of a failed checkpoint's parts (the store
/// may be down; they are removed again after the next upload that lands).
const CLEANUP_WINDOW: Duration = Duration::from_secs(2);

/// What to do after the checkpoint is current.
#[derive(Debug, Clone)]
pub struct AfterUpload {
    /// The metrics log whose pending lines are written next to the checkpoints
    /// (single-process runs).
    pub metrics: Option<Arc<MetricsLog>>,
    /// Checkpoints to keep (newest).
    pub keep_last: usize,
    /// A checkpoint directory to keep besides them (the best).
    pub keep_also: Option<String>,
    /// A cluster worker's check that it is still a member (see [`crate::fence`]).
    pub fence: Option<crate::fence::Fence>,
}

/// The outcome of one upload.
#[derive(Debug, Clone)]
pub struct Uploaded {
    /// Checkpoint directory key.
    pub dir: String,
    /// Step.
    pub step: u64,
    /// Seconds it took (the last try).
    pub seconds: f64,
}

/// A checkpoint handed over for upload.
struct Job {
    /// Order of hand-over (1, 2, …).
    seq: u64,
    store: Store,
    enc: Encoded,
    after: AfterUpload,
    /// Failed tries so far.
    failures: u32,
    backoff: Backoff,
}

/// What the training thread and the upload thread share.
#[derive(Default)]
struct State {
    /// The newest checkpoint handed over (its `seq`; 0: none).
    requested: u64,
    /// Its URL.
    requested_url: String,
    /// Snapshots being encoded.
    encoding: usize,
    /// The newest encoded checkpoint waiting for the upload thread.
    pending: Option<Job>,
    /// When `pending` (a failed upload) is to be tried again.
    retry_at: Option<Instant>,
    /// The step being uploaded.
    busy: Option<u64>,
    /// The last checkpoint that landed, with its `seq`.
    landed: Option<(u64, Uploaded)>,
    /// The checkpoint `latest.json` names as far as this process knows.
    current: Option<String>,
    /// A checkpoint `latest.json` may name instead: its write got no answer.
    unsure: Option<String>,
    /// The last failure, with the `seq` of its checkpoint.
    failure: Option<(u64, String)>,
    /// Keys of failed uploads that could not be removed yet.
    orphans: Vec<String>,
    /// Set when the uploader is dropped: no more tries.
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs checkpoint uploads on a background thread, one at a time, retrying the newest
/// until it lands.
pub struct Uploader {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected once the snapshot in flight is encoded.
    encoding: Option<std::sync::mpsc::Receiver<()>>,
    /// How long [`Uploader::flush`] waits for the newest checkpoint to land.
    grace: Duration,
    /// Whether everything handed over was flushed since.
    flushed: bool,
    /// The process's runtime, which the upload thread blocks on.
    rt: Rt,
}

impl Uploader {
    /// An idle uploader whose [`Uploader::flush`] waits at most `grace`; its uploads run
    /// on `rt`.
    pub fn new(grace: Duration, rt: Rt) -> Self {
        Uploader {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
            }),
            thread: None,
            encoding: None,
            grace,
            flushed: true,
            rt,
        }
    }

    /// Sets how long [`Uploader::flush`] waits for the newest checkpoint to land.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Records the checkpoint `latest.json` names (after a resume), for the messages
    /// that say what stays current when an upload fails.
    pub fn set_current(&mut self, dir: Option<String>) {
        self.shared.lock().current = dir;
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

    /// Hands `snap` over: it is encoded on a thread of its own and then uploaded by the
    /// upload thread, after the upload under way if any; a checkpoint still waiting is
    /// superseded (dropped). Its tensors must not change before
    /// [`Uploader::wait_snapshot`] (or [`Uploader::flush`]) returned. Failures are logged
    /// and retried in the background; [`Uploader::flush`] reports the newest one's.
    pub fn start(&mut self, store: Store, snap: Snapshot, after: AfterUpload) {
        self.wait_snapshot();
        self.flushed = false;
        let step = snap.state.step;
        let seq = {
            let mut s = self.shared.lock();
            s.requested += 1;
            s.requested_url = store.url_of(&checkpoint::dir_for(step));
            s.encoding += 1;
            if let Some(old) = s.pending.take() {
                tracing::info!(
                    step = old.enc.state.step,
                    newer = step,
                    "a checkpoint waiting for upload is superseded by a newer one"
                );
                s.retry_at = None;
            }
            s.requested
        };
        if let Err(e) = self.ensure_thread() {
            self.encoding_failed(seq, step, e);
            return;
        }
        let (done, encoding) = std::sync::mpsc::channel::<()>();
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("scfm-ckpt-encode".into())
            .spawn(move || {
                let enc = snap.encode();
                // Training may change the tensors from here on.
                drop(snap);
                drop(done);
                let mut s = shared.lock();
                s.encoding -= 1;
                match enc {
                    Ok(enc) if s.pending.as_ref().is_none_or(|p| p.seq < seq) => {
                        s.pending = Some(Job {
                            seq,
                            store,
                            enc,
                            after,
                            failures: 0,
                            backoff: Backoff::new(FIRST_REUPLOAD_WAIT, MAX_REUPLOAD_WAIT),
                        });
                        s.retry_at = None;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(step, error = %e, "cannot encode the checkpoint");
                        s.failure = Some((seq, format!("cannot encode the checkpoint: {e}")));
                    }
                }
                shared.changed.notify_all();
            });
        match spawned {
            Ok(_) => self.encoding = Some(encoding),
            Err(e) => self.encoding_failed(seq, step, format!("cannot start a thread: {e}")),
        }
    }

    fn encoding_failed(&self, seq: u64, step: u64, message: String) {
        tracing::error!(step, error = %message, "checkpoint not saved");
        let mut s = self.shared.lock();
        s.encoding -= 1;
        s.failure = Some((seq, message));
        self.shared.changed.notify_all();
    }

    /// Starts the upload thread on first use.
    fn ensure_thread(&mut self) -> std::result::Result<(), String> {
        if self.thread.is_some() {
            return Ok(());
        }
        let shared = self.shared.clone();
        let rt = self.rt.clone();
        let h = std::thread::Builder::new()
            .name("scfm-ckpt-upload".into())
            .spawn(move || upload_loop(&shared, &rt))
            .map_err(|e| format!("cannot start the upload thread: {e}"))?;
        self.thread = Some(h);
        Ok(())
    }

    /// Waits, for at most the uploader's grace, until the newest checkpoint handed over
    /// has landed (a failed upload is retried meanwhile); returns it (`None`: nothing was
    /// handed over). An error when it has not landed by then, naming its step, what stays
    /// current and the last failure.
    pub fn flush(&mut self) -> Result<Option<Uploaded>> {
        self.wait_snapshot();
        // Whatever the outcome, it is the caller's to report (not the drop's).
        self.flushed = true;
        let deadline = Instant::now() + self.grace;
        let mut s = self.shared.lock();
        let settled = loop {
            let settled = s.encoding == 0 && s.busy.is_none() && s.pending.is_none();
            let now = Instant::now();
            if settled || now >= deadline {
                break settled;
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        if s.requested == 0 {
            return Ok(None);
        }
        if let Some((seq, u)) = &s.landed
            && *seq == s.requested
        {
            return Ok(Some(u.clone()));
        }
        let why = match &s.failure {
            Some((_, e)) => e.clone(),
            None => "still being uploaded".into(),
        };
        let message = if settled {
            format!("could not be stored ({why}); {}", what_stays(&s))
        } else {
            format!(
                "not stored within {:.0} s ({why}); {}",
                self.grace.as_secs_f64(),
                what_stays(&s)
            )
        };
        Err(WorkerError::Checkpoint {
            url: s.requested_url.clone(),
            message,
        })
    }
}

/// Whether trying an upload again later may succeed: the store failed in a way that may
/// pass, or a part read back differed from what was written; not a full disk, a refused
/// credential or an encoding error.
fn may_pass(e: &WorkerError) -> bool {
    match e {
        WorkerError::Common(c) => scfm_common::storage::is_transient(c),
        WorkerError::Checkpoint { .. } => true,
        _ => false,
    }
}

/// What a resume would use while the newest checkpoint has not landed.
fn what_stays(s: &State) -> String {
    let stays = match &s.current {
        Some(dir) => format!("{dir} stays current"),
        None => "there is no earlier checkpoint (a resume would start from scratch)".into(),
    };
    match &s.unsure {
        Some(u) if s.current.as_ref() != Some(u) => format!(
            "{stays}, unless the write of latest.json naming {u}, which got no answer, took effect"
        ),
        _ => stays,
    }
}

/// The upload thread: takes the newest waiting checkpoint, uploads it, and on failure
/// puts it back to be tried again unless a newer one arrived meanwhile.
fn upload_loop(shared: &Shared, rt: &Rt) {
    loop {
        let mut job = {
            let mut s = shared.lock();
            loop {
                if s.stop {
                    return;
                }
                let now = Instant::now();
                match (s.pending.is_some(), s.retry_at) {
                    (true, Some(at)) if at > now => {
                        s = shared
                            .changed
                            .wait_timeout(s, at - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    (true, _) => break,
                    (false, _) => s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
                }
            }
            let job = s.pending.take().expect("checked");
            s.retry_at = None;
            s.busy = Some(job.enc.state.step);
            job
        };
        let orphans = std::mem::take(&mut shared.lock().orphans);
        let t = Instant::now();
        let outcome = rt.block_on(upload_once(&job, orphans));
        let mut s = shared.lock();
        s.busy = None;
        let step = job.enc.state.step;
        match outcome {
            Ok((u, orphans)) => {
                s.orphans.extend(orphans);
                if job.failures > 0 {
                    tracing::info!(
                        step,
                        tries = job.failures + 1,
                        "checkpoint saved after its upload was retried"
                    );
                }
                tracing::info!(step, url = %job.store.url_of(&u.dir), seconds = t.elapsed().as_secs_f64(), "checkpoint saved");
                s.current = Some(job.store.url_of(&u.dir));
                s.unsure = None;
                if s.failure.as_ref().is_some_and(|(q, _)| *q <= job.seq) {
                    s.failure = None;
                }
                s.landed = Some((job.seq, u));
            }
            Err(Failed {
                error: e,
                orphans,
                landed,
                unsure,
            }) => {
                s.orphans.extend(orphans);
                if landed.is_some() {
                    s.current = landed;
                }
                if unsure.is_some() {
                    s.unsure = unsure;
                }
                job.failures += 1;
                let stays = what_stays(&s);
                s.failure = Some((job.seq, e.to_string()));
                if s.pending.is_some() || s.encoding > 0 {
                    tracing::error!(step, error = %e, "checkpoint upload failed; {stays}; a newer checkpoint supersedes it");
                } else if !may_pass(&e) {
                    tracing::error!(step, error = %e, "checkpoint upload failed; {stays}; not tried again (waiting does not cure this), the next checkpoint is");
                } else if !s.stop {
                    let wait = job.backoff.next_wait();
                    tracing::error!(step, error = %e, tries = job.failures, retry_in_s = wait.as_secs_f64(), "checkpoint upload failed; {stays}; trying it again in the background");
                    s.retry_at = Some(Instant::now() + wait);
                    s.pending = Some(job);
                } else {
                    tracing::error!(step, error = %e, "checkpoint upload failed; {stays}");
                }
            }
        }
        shared.changed.notify_all();
    }
}

/// A try of a job that failed.
struct Failed {
    error: WorkerError,
    /// Keys still to remove.
    orphans: Vec<String>,
    /// The checkpoint's URL when it did become current (what failed came after).
    landed: Option<String>,
    /// The checkpoint's URL when the write of `latest.json` naming it got no answer.
    unsure: Option<String>,
}

/// One try of a job: the checkpoint, then the metrics log and retention; then the
/// removal of `orphans` (parts of earlier failed uploads not yet removed, except those
/// this upload rewrote). Returns the keys that still could not be removed.
async fn upload_once(
    job: &Job,
    orphans: Vec<String>,
) -> std::result::Result<(Uploaded, Vec<String>), Failed> {
    let store = &job.store;
    let t = Instant::now();
    let cleanup = store.clone().with_retry_window(CLEANUP_WINDOW);
    let dir =
        match checkpoint::try_upload(store, &cleanup, &job.enc, job.after.fence.as_ref()).await {
            Ok(dir) => dir,
            Err(checkpoint::UploadFailed {
                error,
                left,
                unsure,
            }) => {
                let mut all = orphans;
                all.extend(left);
                return Err(Failed {
                    error,
                    orphans: all,
                    landed: None,
                    unsure: unsure.then(|| store.url_of(&job.enc.dir)),
                });
            }
        };
    let mut left = Vec::new();
    for key in orphans {
        if key.starts_with(&format!("{dir}/")) {
            continue;
        }
        if cleanup.delete(&key).await.is_err() {
            left.push(key);
        }
    }
    let after = async {
        if let Some(m) = &job.after.metrics {
            m.flush().await?;
        }
        checkpoint::retain(store, job.after.keep_last, job.after.keep_also.as_deref()).await
    };
    if let Err(error) = after.await {
        // The checkpoint is current, but the job is not done: it is tried again whole.
        return Err(Failed {
            error,
            orphans: left,
            landed: Some(store.url_of(&dir)),
            unsure: None,
        });
    }
    Ok((
        Uploaded {
            dir,
            step: job.enc.state.step,
            seconds: t.elapsed().as_secs_f64(),
        },
        left,
    ))
}

impl Drop for Uploader {
    fn drop(&mut self) {
        if !self.flushed
            && let Err(e) = self.flush()
        {
            tracing::error!(error = %e, "checkpoint upload failed");
        }
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        // An upload still under way (the grace ran out) is left to the process's exit;
        // latest.json is written last, so it never names a half-written checkpoint.
        if let Some(h) = self.thread.take()
            && self.shared.lock().busy.is_none()
        {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::setup;
    use scfm_common::checkpoint::{Latest, dir_for};

    /// Replaces the folder at `root` by a file, so that every write below it fails.
    fn break_store(root: &std::path::Path, keep: &std::path::Path) {
        std::fs::rename(root, keep).unwrap();
        std::fs::write(root, b"not a folder").unwrap();
    }

    #[test]
    fn a_failed_upload_is_retried_in_the_background_and_the_newest_lands() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("ck");
        let store = Store::open(root.to_str().unwrap())
            .unwrap()
            .with_retry_window(Duration::ZERO);
        let url = store.url().to_string();
        break_store(&root, &d.path().join("empty"));
        let (_vs, p, opt, mut state) = setup();
        let after = AfterUpload {
            metrics: None,
            keep_last: 10,
            keep_also: None,
            fence: None,
        };
        let mut up = Uploader::new(Duration::from_secs(1), Rt::new().unwrap());
        up.start(store.clone(), Snapshot::of(&p, &opt, &state), after.clone());
        let e = up.flush().unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "checkpoint {url}/{}: not stored within 1 s",
                dir_for(7)
            )) && e.contains("there is no earlier checkpoint"),
            "{e}"
        );
        // A newer checkpoint supersedes the one waiting to be tried again; the store
        // comes back, and the newest lands with no further hand-over.
        state.step = 8;
        up.start(store.clone(), Snapshot::of(&p, &opt, &state), after.clone());
        up.wait_snapshot();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            {
                let s = up.shared.lock();
                let step8_waits = s.pending.as_ref().map(|j| j.enc.state.step) == Some(8);
                if s.busy.is_none() && s.encoding == 0 && step8_waits {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "step 8 never waited for a retry");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_file(&root).unwrap();
        std::fs::create_dir(&root).unwrap();
        up.set_grace(Duration::from_secs(60));
        let landed = up.flush().unwrap().unwrap();
        assert_eq!((landed.step, landed.dir.as_str()), (8, dir_for(8).as_str()));
        let latest: Latest =
            serde_json::from_slice(&std::fs::read(root.join("latest.json")).unwrap()).unwrap();
        assert_eq!(latest.dir, dir_for(8));
        assert!(
            !root.join(dir_for(7)).exists(),
            "the superseded step 7 was stored"
        );
        // Down again: the message names the checkpoint that stays current.
        break_store(&root, &d.path().join("kept"));
        state.step = 9;
        up.set_grace(Duration::from_secs(1));
        up.start(store, Snapshot::of(&p, &opt, &state), after);
        let e = up.flush().unwrap_err().to_string();
        assert!(
            e.contains(&dir_for(9)) && e.contains(&format!("{url}/{} stays current", dir_for(8))),
            "{e}"
        );
    }

    /// A worker the coordinator replaced by a newer generation commits nothing: the
    /// checkpoint's parts are removed, `latest.json` keeps naming the one before, and
    /// the worker's job ends.
    #[test]
    fn a_fenced_worker_commits_no_checkpoint_and_ends() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().to_str().unwrap()).unwrap();
        let (_vs, p, opt, mut state) = setup();
        let control = crate::Control::default();
        let fence = crate::fence::Fence {
            run_id: "run-x".into(),
            worker_id: "w0".into(),
            generation: 2,
            control: control.clone(),
        };
        let after = AfterUpload {
            metrics: None,
            keep_last: 10,
            keep_also: None,
            fence: Some(fence),
        };
        let mut up = Uploader::new(Duration::from_secs(10), Rt::new().unwrap());
        up.start(store.clone(), Snapshot::of(&p, &opt, &state), after.clone());
        assert_eq!(
            up.flush().unwrap().unwrap().step,
            7,
            "no coordinator.json: lands"
        );
        // The coordinator formed generation 3 of this run with other workers.
        let persisted = serde_json::json!({"run_id": "run-x", "generation": 3,
            "members": [{"id": "w5"}, {"id": "w6"}]});
        std::fs::write(
            d.path().join(crate::fence::COORDINATOR_KEY),
            serde_json::to_vec(&persisted).unwrap(),
        )
        .unwrap();
        state.step = 8;
        up.start(store, Snapshot::of(&p, &opt, &state), after);
        let e = up.flush().unwrap_err().to_string();
        assert!(e.contains("generation 3 without this worker"), "{e}");
        assert!(control.ended().is_some());
        let latest: Latest =
            serde_json::from_slice(&std::fs::read(d.path().join("latest.json")).unwrap()).unwrap();
        assert_eq!(latest.dir, dir_for(7));
        assert!(
            !d.path().join(dir_for(8)).exists(),
            "the fenced checkpoint's parts stay"
        );
    }
}
