//! `scfm status`: the state of a job, from its running coordinator (the `Status` RPC,
//! [`live`]) or from the files of a run that is not running ([`files`]).
//!
//! Both give a [`JobStatus`]; the protobuf answer is converted to it at the edge.

pub mod files;
pub mod live;

use std::fmt;

use scfm_common::rpc::pb;
use serde::Serialize;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// The files do not tell (or the coordinator sent a state this build does not know).
    Unknown,
    /// The coordinator waits for workers to join.
    Joining,
    /// Training.
    Running,
    /// Fewer than `min_workers` remain: the state is checkpointed, waiting for workers.
    Holding,
    /// Workers checkpoint at the next step and stop.
    Preempting,
    /// The run reached its last step (or stopped early on the validation loss).
    Finished,
    /// Stopped on a preemption after a checkpoint (relaunch to resume).
    Preempted,
    /// The job failed.
    Failed,
    /// Ended before its last step (preempted, failed or killed: a relaunch resumes).
    Stopped,
}

impl RunState {
    /// The lowercase name (as `--json` prints it).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Unknown => "unknown",
            RunState::Joining => "joining",
            RunState::Running => "running",
            RunState::Holding => "holding",
            RunState::Preempting => "preempting",
            RunState::Finished => "finished",
            RunState::Preempted => "preempted",
            RunState::Failed => "failed",
            RunState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<pb::RunState> for RunState {
    fn from(s: pb::RunState) -> Self {
        match s {
            pb::RunState::Unknown => RunState::Unknown,
            pb::RunState::Joining => RunState::Joining,
            pb::RunState::Running => RunState::Running,
            pb::RunState::Holding => RunState::Holding,
            pb::RunState::Preempting => RunState::Preempting,
            pb::RunState::Finished => RunState::Finished,
            pb::RunState::Preempted => RunState::Preempted,
            pb::RunState::Failed => RunState::Failed,
            pb::RunState::Stopped => RunState::Stopped,
        }
    }
}

impl From<RunState> for pb::RunState {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Unknown => pb::RunState::Unknown,
            RunState::Joining => pb::RunState::Joining,
            RunState::Running => pb::RunState::Running,
            RunState::Holding => pb::RunState::Holding,
            RunState::Preempting => pb::RunState::Preempting,
            RunState::Finished => pb::RunState::Finished,
            RunState::Preempted => pb::RunState::Preempted,
            RunState::Failed => pb::RunState::Failed,
            RunState::Stopped => pb::RunState::Stopped,
        }
    }
}

/// The newest checkpoint of a run (`latest.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointStatus {
    /// Its step.
    pub step: u64,
    /// Its URL.
    pub url: String,
    /// Seconds since `latest.json` was written (`None`: unknown).
    pub age_s: Option<f64>,
}

/// The state of a job, as `scfm status` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobStatus {
    /// Where it was read: the coordinator's URL or the run's checkpoint URL.
    pub source: String,
    /// Run id, when known.
    pub run_id: Option<String>,
    /// Where the job is.
    pub state: RunState,
    /// More about the state (why it failed, what it waits for), if anything.
    pub detail: Option<String>,
    /// The last step reported (or the step the run resumed from).
    pub step: u64,
    /// Steps of the whole run, as the workers plan it (`None`: not known yet).
    pub total_steps: Option<u64>,
    /// Epoch of the last step.
    pub epoch: Option<u64>,
    /// Estimated seconds to the last step, from the recent step rate (running jobs).
    pub eta_s: Option<f64>,
    /// Cells per second (all workers together) at the last step.
    pub cells_per_s: Option<f64>,
    /// Workers registered and not lost (running jobs).
    pub workers_alive: Option<u32>,
    /// Workers of the current (or last) generation.
    pub world_size: Option<u32>,
    /// Membership generation (of the last step, for a run read from its files).
    pub generation: Option<u64>,
    /// Total loss at the last step.
    pub loss: Option<f64>,
    /// MGEM loss at the last step.
    pub mgem: Option<f64>,
    /// NT-Xent (contrastive) loss at the last step.
    pub contrastive: Option<f64>,
    /// The latest validation loss.
    pub val_loss: Option<f64>,
    /// The step of that validation loss, when known.
    pub val_step: Option<u64>,
    /// The newest checkpoint.
    pub checkpoint: Option<CheckpointStatus>,
}

impl JobStatus {
    /// Takes the epoch, planned total, losses and throughput of the last reported step.
    pub fn set_last_step(&mut self, l: &crate::metrics::LastStep) {
        self.epoch = Some(l.epoch);
        self.total_steps = l.total_steps;
        self.loss = Some(l.loss);
        self.mgem = Some(l.mgem);
        self.contrastive = Some(l.contrastive);
        self.cells_per_s = Some(l.cells_per_s).filter(|c| c.is_finite());
    }

    /// An empty status of `source` in `state`.
    pub fn new(source: impl Into<String>, state: RunState) -> Self {
        JobStatus {
            source: source.into(),
            run_id: None,
            state,
            detail: None,
            step: 0,
            total_steps: None,
            epoch: None,
            eta_s: None,
            cells_per_s: None,
            workers_alive: None,
            world_size: None,
            generation: None,
            loss: None,
            mgem: None,
            contrastive: None,
            val_loss: None,
            val_step: None,
            checkpoint: None,
        }
    }

    /// The status a coordinator at `source` answered.
    pub fn from_pb(r: pb::StatusResponse, source: impl Into<String>) -> Self {
        let state = pb::RunState::try_from(r.state).map_or(RunState::Unknown, RunState::from);
        JobStatus {
            source: source.into(),
            run_id: Some(r.run_id).filter(|s| !s.is_empty()),
            state,
            detail: Some(r.detail).filter(|s| !s.is_empty()),
            step: r.step,
            total_steps: r.total_steps,
            epoch: r.epoch,
            eta_s: r.eta_s,
            cells_per_s: r.cells_per_s,
            workers_alive: Some(r.workers_alive),
            world_size: Some(r.world_size),
            generation: Some(r.generation),
            loss: r.loss,
            mgem: r.mgem,
            contrastive: r.contrastive,
            val_loss: r.val_loss,
            val_step: r.val_step,
            checkpoint: r.checkpoint.map(|c| CheckpointStatus {
                step: c.step,
                url: c.url,
                age_s: c.age_s,
            }),
        }
    }
}

impl From<&JobStatus> for pb::StatusResponse {
    fn from(s: &JobStatus) -> Self {
        pb::StatusResponse {
            run_id: s.run_id.clone().unwrap_or_default(),
            state: pb::RunState::from(s.state) as i32,
            detail: s.detail.clone().unwrap_or_default(),
            step: s.step,
            total_steps: s.total_steps,
            epoch: s.epoch,
            eta_s: s.eta_s,
            cells_per_s: s.cells_per_s,
            workers_alive: s.workers_alive.unwrap_or(0),
            world_size: s.world_size.unwrap_or(0),
            generation: s.generation.unwrap_or(0),
            loss: s.loss,
            mgem: s.mgem,
            contrastive: s.contrastive,
            val_loss: s.val_loss,
            val_step: s.val_step,
            checkpoint: s.checkpoint.as_ref().map(|c| pb::CheckpointStatus {
                step: c.step,
                url: c.url.clone(),
                age_s: c.age_s,
            }),
        }
    }
}

/// What `scfm status ARG` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A running coordinator, as a URL (`http://host:port` or `https://…`).
    Coordinator(String),
    /// A run's checkpoint URL or directory.
    Run(String),
}

impl Target {
    /// `http(s)://…` is a coordinator; another `scheme://` (file, s3, gs, az) or a path is a
    /// run; a bare `host:port` (port digits, no `/`) is a coordinator unless a local path
    /// of that name exists.
    pub fn parse(arg: &str) -> Target {
        if arg.starts_with("http://") || arg.starts_with("https://") {
            return Target::Coordinator(arg.to_string());
        }
        if arg.contains("://") {
            return Target::Run(arg.to_string());
        }
        let host_port = arg.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
        }) && !arg.contains('/');
        if host_port && !std::path::Path::new(arg).exists() {
            Target::Coordinator(format!("http://{arg}"))
        } else {
            Target::Run(arg.to_string())
        }
    }
}

fn secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        x.to_string()
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let run = self.run_id.as_deref().unwrap_or("(run id unknown)");
        writeln!(f, "job {run}: {} ({})", self.state, self.source)?;
        if let Some(d) = &self.detail {
            writeln!(f, "  {d}")?;
        }
        let total = self.total_steps.map_or("?".to_string(), |t| t.to_string());
        let pct = self
            .total_steps
            .filter(|&t| t > 0)
            .map_or(String::new(), |t| {
                format!(" ({:.1}%)", 100.0 * self.step as f64 / t as f64)
            });
        write!(f, "  step        {} / {total}{pct}", self.step)?;
        if let Some(e) = self.epoch {
            write!(f, ", epoch {e}")?;
        }
        writeln!(f)?;
        if let Some(eta) = self.eta_s {
            writeln!(f, "  ETA         {}", secs(eta))?;
        }
        if let Some(c) = self.cells_per_s {
            writeln!(f, "  cells/s     {c:.0}")?;
        }
        match (self.workers_alive, self.generation, self.world_size) {
            (Some(a), g, w) => writeln!(
                f,
                "  workers     {a} alive; generation {} of {} workers",
                g.unwrap_or(0),
                w.unwrap_or(0)
            )?,
            (None, Some(g), Some(w)) if g > 0 || w > 0 => writeln!(
                f,
                "  workers     generation {g} of {w} workers at the last step"
            )?,
            _ => {}
        }
        if let Some(l) = self.loss {
            write!(f, "  loss        {}", num(l))?;
            if let (Some(m), Some(c)) = (self.mgem, self.contrastive) {
                write!(f, " (MGEM {}, NT-Xent {})", num(m), num(c))?;
            }
            writeln!(f)?;
        }
        if let Some(v) = self.val_loss {
            match self.val_step {
                Some(s) => writeln!(f, "  validation  {} at step {s}", num(v))?,
                None => writeln!(f, "  validation  {}", num(v))?,
            }
        }
        match &self.checkpoint {
            Some(c) => {
                let age = c
                    .age_s
                    .map_or(String::new(), |a| format!(", {} ago", secs(a)));
                writeln!(f, "  checkpoint  step {}{age}: {}", c.step, c.url)?;
            }
            None => writeln!(f, "  checkpoint  none yet")?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_told_apart() {
        let c = |s: &str| Target::Coordinator(s.to_string());
        let r = |s: &str| Target::Run(s.to_string());
        assert_eq!(
            Target::parse("http://10.0.0.1:7000"),
            c("http://10.0.0.1:7000")
        );
        assert_eq!(Target::parse("https://coord:443"), c("https://coord:443"));
        assert_eq!(
            Target::parse("coord.local:7000"),
            c("http://coord.local:7000")
        );
        assert_eq!(Target::parse("127.0.0.1:7000"), c("http://127.0.0.1:7000"));
        assert_eq!(Target::parse("s3://bucket/run"), r("s3://bucket/run"));
        assert_eq!(Target::parse("file:///tmp/run"), r("file:///tmp/run"));
        assert_eq!(Target::parse("runs/a:1"), r("runs/a:1"));
        assert_eq!(Target::parse("ckpt"), r("ckpt"));
    }

    #[test]
    fn status_survives_the_protobuf_roundtrip_and_prints() {
        let mut s = JobStatus::new("http://127.0.0.1:1", RunState::Running);
        s.run_id = Some("r".into());
        s.step = 40;
        s.total_steps = Some(80);
        s.epoch = Some(0);
        s.eta_s = Some(75.0);
        s.workers_alive = Some(2);
        s.world_size = Some(2);
        s.generation = Some(1);
        s.loss = Some(5.5);
        s.mgem = Some(5.0);
        s.contrastive = Some(0.5);
        s.val_loss = Some(5.25);
        s.val_step = Some(20);
        s.checkpoint = Some(CheckpointStatus {
            step: 20,
            url: "file:///x/ckpt-000000020".into(),
            age_s: Some(3.0),
        });
        let back = JobStatus::from_pb((&s).into(), "http://127.0.0.1:1");
        assert_eq!(back, s);
        let text = s.to_string();
        for want in [
            "job r: running",
            "step        40 / 80 (50.0%), epoch 0",
            "ETA         1m15s",
            "2 alive; generation 1 of 2 workers",
            "loss        5.5000 (MGEM 5.0000, NT-Xent 0.5000)",
            "validation  5.2500 at step 20",
            "checkpoint  step 20, 3 s ago: file:///x/ckpt-000000020",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            (v["state"].as_str(), v["step"].as_u64()),
            (Some("running"), Some(40))
        );
        // An unknown state number from a newer coordinator reads as unknown.
        let odd = pb::StatusResponse {
            state: 99,
            ..Default::default()
        };
        assert_eq!(JobStatus::from_pb(odd, "x").state, RunState::Unknown);
    }
}
