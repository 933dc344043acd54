//! The gradient all-reduce overlapped with the backward pass (`cluster.overlap_allreduce`).
//!
//! The parameters are grouped into one bucket per backward stage
//! ([`crate::model::stages`]): the heads (with the final LayerNorm), each block from the
//! last down, the embeddings. While the main thread differentiates stage `s + 1`, a communication thread
//! all-reduces bucket `s` over the same collective, in stage order (the same order on
//! every rank). The buffers are disjoint: a stage's gradients are final before its bucket
//! is handed over, and no later stage writes them. Each bucket is all-reduced with the
//! same ring algorithm as the flat buffer, so every rank ends with the same bits; with two
//! ranks the values equal the flat all-reduce's too (one addition per element either way).
//!
//! Only CPU gradients overlap this way; CUDA gradients (NCCL, or the ring through a host
//! copy) are all-reduced after the backward pass as before.

use std::ops::Range;
use std::sync::mpsc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::collective::{Collective, CollectiveError};
use crate::error::{Result, WorkerError};
use crate::model::stages::{Cuts, backward_staged, stage_of};
use crate::params::FlatParams;

/// The gradient buckets of a model: for each backward stage, the element ranges of the
/// flat gradient that stage makes final.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    stages: Vec<Vec<Range<usize>>>,
}

/// Where the time of an overlapped all-reduce went.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AllReduceTimes {
    /// Seconds the buckets' all-reduces ran (on the communication thread).
    pub busy_s: f64,
    /// Seconds the step waited for them after its backward pass ended: the part of the
    /// all-reduce that computation did not hide, plus the hand-off to and from the
    /// communication thread (a thread the scheduler has not run yet counts here, so on a
    /// loaded machine this can exceed `busy_s`).
    pub wait_s: f64,
}

impl Buckets {
    /// The buckets of `params` for a model of `n_layers` blocks (`n_layers + 2` stages).
    pub fn new(params: &FlatParams, n_layers: usize) -> Self {
        let mut stages: Vec<Vec<Range<usize>>> = vec![Vec::new(); n_layers + 2];
        for s in &params.slots {
            let r = s.offset as usize..(s.offset + s.numel) as usize;
            let ranges = &mut stages[stage_of(&s.name, n_layers)];
            match ranges.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => ranges.push(r),
            }
        }
        Buckets { stages }
    }

    /// Number of stages (buckets, some possibly empty).
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Whether there are no stages.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Elements in stage `s`'s bucket.
    pub fn numel(&self, s: usize) -> usize {
        self.stages[s].iter().map(|r| r.len()).sum()
    }
}

/// Whether gradients in `grad` can be all-reduced during the backward pass.
pub fn supported(grad: &Tensor) -> bool {
    grad.device() == Device::Cpu && grad.kind() == Kind::Float && grad.is_contiguous()
}

/// Differentiates `loss` in stages ([`backward_staged`]) while a second thread
/// all-reduces (mean) each finished stage's bucket of `grad` over `coll`. Returns when the
/// backward pass and every bucket are done; the first collective failure is the error.
pub fn backward_overlapped(
    loss: &Tensor,
    cuts: Cuts,
    buckets: &Buckets,
    grad: &Tensor,
    coll: &mut dyn Collective,
) -> Result<AllReduceTimes> {
    if !supported(grad) {
        return Err(WorkerError::Internal(
            "an overlapped all-reduce needs a contiguous fp32 CPU gradient".into(),
        ));
    }
    if buckets.len() != cuts.len() + 1 {
        return Err(WorkerError::Internal(format!(
            "{} gradient buckets for {} backward stages",
            buckets.len(),
            cuts.len() + 1
        )));
    }
    let total = grad.numel();
    if buckets.stages.iter().flatten().any(|r| r.end > total) {
        return Err(WorkerError::Internal(
            "a gradient bucket lies outside the gradient".into(),
        ));
    }
    // The address travels as an integer: the threads touch disjoint ranges (see below).
    let base = grad.data_ptr() as usize;
    let (tx, rx) = mpsc::channel::<usize>();
    std::thread::scope(|scope| {
        let comm = scope.spawn(move || {
            let mut busy = 0.0;
            let mut staging: Vec<f32> = Vec::new();
            for s in rx {
                let t = Instant::now();
                // SAFETY: `grad` is a contiguous fp32 CPU tensor of `total` elements that
                // outlives this scope, and every range lies inside it (checked above).
                // Stage `s`'s gradients are final once the main thread sent `s`; from then
                // on only this thread touches its ranges (later stages write other
                // parameters' gradients, and the main thread reads none until the join).
                let r = unsafe {
                    reduce_bucket(base as *mut f32, &buckets.stages[s], &mut staging, coll)
                };
                busy += t.elapsed().as_secs_f64();
                r?;
            }
            Ok::<f64, CollectiveError>(busy)
        });
        backward_staged(loss, cuts, |s| {
            if buckets.numel(s) > 0 {
                // A closed channel means the communication thread failed: its error is
                // returned at the join.
                let _ = tx.send(s);
            }
        });
        drop(tx);
        let t = Instant::now();
        let busy = comm
            .join()
            .map_err(|_| WorkerError::Internal("the all-reduce thread panicked".into()))??;
        Ok(AllReduceTimes {
            busy_s: busy,
            wait_s: t.elapsed().as_secs_f64(),
        })
    })
}

/// All-reduces (mean) the elements `ranges` of the buffer at `base`: in place when they
/// are one range, else packed into `staging` and back.
///
/// # Safety
/// Every range must lie inside the buffer, and no other thread may access them meanwhile.
unsafe fn reduce_bucket(
    base: *mut f32,
    ranges: &[Range<usize>],
    staging: &mut Vec<f32>,
    coll: &mut dyn Collective,
) -> std::result::Result<(), CollectiveError> {
    // SAFETY: per the function's contract.
    let slice =
        |r: &Range<usize>| unsafe { std::slice::from_raw_parts_mut(base.add(r.start), r.len()) };
    if let [one] = ranges {
        return coll.all_reduce_mean(slice(one));
    }
    staging.clear();
    for r in ranges {
        staging.extend_from_slice(slice(r));
    }
    coll.all_reduce_mean(staging)?;
    let mut at = 0;
    for r in ranges {
        slice(r).copy_from_slice(&staging[at..at + r.len()]);
        at += r.len();
    }
    Ok(())
}

#[cfg(test)]
#[path = "overlap_tests.rs"]
mod tests;
