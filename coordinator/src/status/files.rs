//! The status of a run that is not running, from its files under the checkpoint URL:
//! `latest.json` (the newest checkpoint and when it was written), that checkpoint's
//! `state.json` (epoch, validation loss) and the end of the metrics log (the last step,
//! its losses and the run's planned length), plus `coordinator.json`, which exists while
//! a coordinator runs a generation.
//!
//! The files tell a finished run (its checkpoint is at the planned last step) from one
//! that stopped before the end; they do not tell whether that stop was early stopping, a
//! preemption, a failure or a kill, so such a run is reported as `stopped`.

use scfm_common::checkpoint::StateFile;
use scfm_common::metrics_log;
use scfm_common::storage::Store;

use super::live::latest_checkpoint;
use super::{JobStatus, RunState};
use crate::error::CoordinatorError;
use crate::metrics::{LastStep, val_of_line};
use crate::persist;

/// Bytes of the metrics log's end read first (a few hundred lines); more only when they
/// hold no step line.
const TAIL: u64 = 64 << 10;
/// The most of the metrics log's end ever read.
const TAIL_MAX: u64 = 4 << 20;

/// What the end of the metrics log tells.
#[derive(Debug, Default, PartialEq)]
pub struct MetricsTail {
    /// The last step line.
    pub last: Option<LastStep>,
    /// The last validation loss: `(step, loss)`.
    pub val: Option<(u64, f64)>,
}

impl MetricsTail {
    /// Reads the last lines of the log.
    pub fn of(lines: &[serde_json::Value]) -> MetricsTail {
        let mut t = MetricsTail::default();
        for v in lines {
            if let Some(l) = LastStep::from_line(v) {
                // The last line of the highest step (a later generation may redo steps).
                if t.last.as_ref().is_none_or(|p| l.step >= p.step) {
                    t.last = Some(l);
                }
            }
            if let Some(val) = val_of_line(v) {
                t.val = Some(val);
            }
        }
        t
    }
}

/// Reads the end of the metrics log: its newest part, and older ones until a step line.
async fn metrics_tail(store: &Store) -> Result<Option<MetricsTail>, CoordinatorError> {
    let mut want = TAIL;
    loop {
        let Some(lines) = metrics_log::read_tail(store, want).await? else {
            return Ok(None);
        };
        let t = MetricsTail::of(&lines);
        if t.last.is_some() || want >= TAIL_MAX {
            return Ok(Some(t));
        }
        want *= 8;
    }
}

/// The status of the run whose checkpoints are at `url` (a local directory, `file://`,
/// `s3://`, `gs://` or `az://`).
pub async fn read(url: &str) -> Result<JobStatus, CoordinatorError> {
    let local = url
        .strip_prefix("file://")
        .or((!url.contains("://")).then_some(url));
    if let Some(p) = local
        && !std::path::Path::new(p).is_dir()
    {
        return Err(CoordinatorError::Config(format!(
            "{p} is not a directory (expected a run's checkpoint URL or a coordinator's host:port)"
        )));
    }
    let store = Store::open(url)?;
    let checkpoint = latest_checkpoint(&store).await?;
    let tail = metrics_tail(&store).await?;
    let running = persist::load(&store).await?;
    if checkpoint.is_none() && tail.is_none() && running.is_none() {
        return Err(CoordinatorError::Checkpoint(format!(
            "{}: no run here (no latest.json, metrics log or coordinator.json)",
            store.url()
        )));
    }
    let state = match &checkpoint {
        Some(c) => {
            let dir = c.url.rsplit('/').next().unwrap_or_default();
            let key = format!("{dir}/state.json");
            match store.get_opt(&key).await? {
                Some(b) => serde_json::from_slice::<StateFile>(&b).ok(),
                None => None,
            }
        }
        None => None,
    };
    let mut st = JobStatus::new(store.url(), RunState::Unknown);
    st.run_id = running.as_ref().map(|p| p.run_id.clone());
    st.checkpoint = checkpoint;
    let ckpt_step = st.checkpoint.as_ref().map(|c| c.step);
    let tail = tail.unwrap_or_default();
    if let Some(l) = &tail.last {
        st.set_last_step(l);
        st.generation = Some(l.generation).filter(|&g| g > 0);
        st.world_size = Some(l.world_size as u32).filter(|&w| w > 0);
    }
    st.step = tail
        .last
        .as_ref()
        .map(|l| l.step)
        .into_iter()
        .chain(ckpt_step)
        .max()
        .unwrap_or(0);
    if let Some((step, v)) = tail.val {
        (st.val_step, st.val_loss) = (Some(step), Some(v));
    } else if let Some(v) = state.as_ref().and_then(|s| s.state["val_loss"].as_f64()) {
        // Evaluated at or before the checkpoint; the step is not recorded.
        st.val_loss = Some(v);
    }
    if st.epoch.is_none() {
        st.epoch = state.as_ref().and_then(|s| s.state["epoch"].as_u64());
    }
    (st.state, st.detail) = judge(ckpt_step, st.step, st.total_steps, running.is_some());
    Ok(st)
}

/// The state the files tell: `ckpt` is the newest checkpoint's step, `step` the last step
/// reported, `total` the planned length, `coordinator_json` whether `coordinator.json`
/// exists.
pub fn judge(
    ckpt: Option<u64>,
    step: u64,
    total: Option<u64>,
    coordinator_json: bool,
) -> (RunState, Option<String>) {
    if coordinator_json {
        return (
            RunState::Unknown,
            Some("coordinator.json is present: a coordinator is running this job (ask it: scfm status HOST:PORT) or was killed while training".into()),
        );
    }
    match (ckpt, total) {
        (Some(c), Some(t)) if c >= t => (RunState::Finished, None),
        (Some(c), Some(t)) => (
            RunState::Stopped,
            Some(format!(
                "stopped at step {step} of {t} (early stopping, a preemption, a failure or a kill: the files do not tell which); launching the same manifest resumes from the checkpoint at step {c}"
            )),
        ),
        (None, Some(t)) => (
            RunState::Stopped,
            Some(format!(
                "stopped at step {step} of {t} without a checkpoint; launching the manifest starts over"
            )),
        ),
        (_, None) => (
            RunState::Unknown,
            Some("the metrics log does not record the run's planned length (written by an older scfm?)".into()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::Bytes;
    use scfm_common::checkpoint::{LATEST, Latest, METRICS, dir_for};
    use scfm_common::storage::sha256_hex;

    use super::*;

    fn step_line(step: u64, total: u64, val: Option<f64>) -> String {
        serde_json::json!({
            "event": "step", "worker": "w0000", "generation": 1, "step": step, "epoch": step / 10,
            "loss": 6.0 - step as f64 * 0.01, "mgem": 5.0, "contrastive": 0.5, "cells_per_s": 800.0,
            "val_loss": val, "world_size": 2, "total_steps": total,
        })
        .to_string()
    }

    /// A run dir with checkpoint `ckpt` and metrics for steps 1..=`last` of `total`.
    async fn run_dir(dir: &std::path::Path, ckpt: Option<u64>, last: u64, total: u64) -> Store {
        let store = Store::open(dir.to_str().unwrap()).unwrap();
        let mut text = String::new();
        for s in 1..=last {
            for _ in 0..2 {
                text.push_str(&step_line(s, total, (s == 20).then_some(4.5)));
                text.push('\n');
            }
        }
        store.put(METRICS, Bytes::from(text)).await.unwrap();
        if let Some(c) = ckpt {
            let sf = StateFile {
                state: serde_json::json!({"step": c, "epoch": 3, "position": 0, "val_loss": 4.75}),
                files: HashMap::new(),
                sizes: HashMap::new(),
            };
            let sb = serde_json::to_vec(&sf).unwrap();
            let l = Latest {
                step: c,
                dir: dir_for(c),
                state_sha256: sha256_hex(&sb),
            };
            store
                .put(&format!("{}/state.json", dir_for(c)), sb.into())
                .await
                .unwrap();
            store
                .put(LATEST, serde_json::to_vec(&l).unwrap().into())
                .await
                .unwrap();
        }
        store
    }

    #[tokio::test]
    async fn a_finished_run_reports_its_last_step_and_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        // 800 lines (~200 KiB): more than the first tail read, which starts mid-line.
        run_dir(d.path(), Some(400), 400, 400).await;
        let st = read(d.path().to_str().unwrap()).await.unwrap();
        assert_eq!(st.state, RunState::Finished, "{st:?}");
        assert_eq!(
            (st.step, st.total_steps, st.epoch),
            (400, Some(400), Some(40))
        );
        assert_eq!((st.generation, st.world_size), (Some(1), Some(2)));
        assert!((st.loss.unwrap() - 2.0).abs() < 1e-9);
        assert_eq!((st.mgem, st.contrastive), (Some(5.0), Some(0.5)));
        // Step 20's validation loss is beyond the tail: the checkpoint's is used.
        assert_eq!((st.val_loss, st.val_step), (Some(4.75), None));
        let c = st.checkpoint.unwrap();
        assert_eq!(c.step, 400);
        assert!(c.url.ends_with("/ckpt-000000400"), "{}", c.url);
        assert!(c.age_s.unwrap() < 600.0);
        assert_eq!(st.workers_alive, None);
        assert_eq!(st.eta_s, None);
    }

    #[tokio::test]
    async fn a_run_that_stopped_early_says_so_and_what_resumes() {
        let d = tempfile::tempdir().unwrap();
        run_dir(d.path(), Some(20), 23, 100).await;
        let url = format!("file://{}", d.path().display());
        let st = read(&url).await.unwrap();
        assert_eq!(st.state, RunState::Stopped);
        assert_eq!(
            (st.step, st.val_loss, st.val_step),
            (23, Some(4.5), Some(20))
        );
        let detail = st.detail.unwrap();
        assert!(
            detail.contains("step 23 of 100") && detail.contains("step 20"),
            "{detail}"
        );
        // A coordinator's state file: it may be running; the files cannot tell.
        std::fs::write(
            d.path().join(persist::KEY),
            r#"{"run_id":"r9","generation":2,"members":[],"step":20,"epoch":0,"position":0,"resume_dir":null,"next_id":2}"#,
        )
        .unwrap();
        let st = read(&url).await.unwrap();
        assert_eq!(
            (st.state, st.run_id.as_deref()),
            (RunState::Unknown, Some("r9"))
        );
    }

    #[tokio::test]
    async fn no_run_and_no_directory_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = read(d.path().to_str().unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no run here"), "{e}");
        let missing = d.path().join("nope");
        let e = read(missing.to_str().unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a directory"), "{e}");
        assert!(
            !missing.exists(),
            "reading a status must not create the directory"
        );
    }

    #[test]
    fn judging_without_the_planned_length_is_honest() {
        assert_eq!(judge(Some(5), 5, None, false).0, RunState::Unknown);
        assert_eq!(
            judge(Some(5), 5, Some(5), false),
            (RunState::Finished, None)
        );
        assert_eq!(judge(None, 3, Some(5), false).0, RunState::Stopped);
        let lines = [
            serde_json::json!({"event": "eval", "step": 8, "val_loss": 1.5}),
            serde_json::json!({"event": "checkpoint", "step": 8}),
        ];
        let t = MetricsTail::of(&lines);
        assert_eq!((t.last, t.val), (None, Some((8, 1.5))));
    }
}
