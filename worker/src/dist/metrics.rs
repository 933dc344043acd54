//! The worker's stream of step metrics to the coordinator: every report kept until the
//! coordinator acknowledges it as written, and sent again after a reconnection.

use std::time::Duration;

use scfm_common::rpc::pb;

use super::client::Client;
use crate::trainer::StepReport;

/// Reports kept until the coordinator acknowledges them (about 4 MB): at 10 steps/s, half
/// an hour of a coordinator's absence. Beyond it the oldest are dropped, with a warning.
const MAX_UNACKED: usize = 20_000;
/// How long a worker that finished waits for the acknowledgement of its last reports.
pub(super) const FINAL_ACK_WAIT: Duration = Duration::from_secs(30);
/// Reports sent or to send, oldest first, until acknowledged.
#[derive(Default)]
struct Unacked {
    reports: std::collections::VecDeque<pb::StepMetrics>,
    /// How many of the oldest were sent on the current stream.
    sent: usize,
    /// Dropped because the buffer was full.
    dropped: u64,
}

impl Unacked {
    fn push(&mut self, m: pb::StepMetrics) {
        if self.reports.len() >= MAX_UNACKED {
            self.reports.pop_front();
            self.sent = self.sent.saturating_sub(1);
            self.dropped += 1;
            if self.dropped == 1 || self.dropped.is_multiple_of(1000) {
                tracing::warn!(
                    dropped = self.dropped,
                    kept = MAX_UNACKED,
                    "the coordinator has not acknowledged metrics for long: dropping the oldest reports"
                );
            }
        }
        self.reports.push_back(m);
    }

    /// Forgets the reports up to `(generation, step)` (sent in that order).
    fn ack(&mut self, a: &pb::MetricsAck) {
        while self
            .reports
            .front()
            .is_some_and(|m| (m.generation, m.step) <= (a.generation, a.step))
        {
            self.reports.pop_front();
            self.sent = self.sent.saturating_sub(1);
        }
    }
}

/// Streams step metrics to the coordinator and keeps each report until the coordinator
/// acknowledges it as written. Whenever the stream breaks (e.g. while a restarted
/// coordinator comes back), it reconnects after a pause and sends the unacknowledged
/// reports again, oldest first; the coordinator drops those it already has. Training is
/// never held up: the buffer is bounded ([`MAX_UNACKED`]). After training, it waits up to
/// [`FINAL_ACK_WAIT`] for the last acknowledgement.
pub(super) async fn forward_metrics(
    mut c: Client,
    mut arx: tokio::sync::mpsc::Receiver<pb::StepMetrics>,
) {
    let mut q = Unacked::default();
    let mut input_done = false;
    let mut give_up: Option<tokio::time::Instant> = None;
    loop {
        if input_done && q.reports.is_empty() {
            return;
        }
        if input_done && give_up.is_none() {
            give_up = Some(tokio::time::Instant::now() + FINAL_ACK_WAIT);
        }
        if give_up.is_some_and(|t| tokio::time::Instant::now() >= t) {
            tracing::warn!(
                reports = q.reports.len(),
                "the coordinator did not acknowledge the last metrics reports in time; they may be missing from its log"
            );
            return;
        }
        q.sent = 0;
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::StepMetrics>(64);
        let call = c.stream_metrics(tokio_stream::wrappers::ReceiverStream::new(rx));
        let opened = tokio::time::timeout(Duration::from_secs(10), call).await;
        let acks = match opened {
            Ok(Ok(r)) => Some(r.into_inner()),
            Ok(Err(s)) => {
                tracing::warn!(error = %s.message(), "cannot stream metrics to the coordinator; trying again");
                None
            }
            Err(_) => {
                tracing::warn!(
                    "the coordinator did not open the metrics stream in time; trying again"
                );
                None
            }
        };
        if let Some(mut stream) = acks {
            let mut tx = Some(tx);
            loop {
                if input_done && q.reports.is_empty() {
                    return;
                }
                if input_done && give_up.is_none() {
                    give_up = Some(tokio::time::Instant::now() + FINAL_ACK_WAIT);
                }
                let until = give_up.unwrap_or_else(tokio::time::Instant::now);
                // Everything sent after training ended: close our side, the coordinator
                // writes and acknowledges.
                if input_done && q.sent == q.reports.len() {
                    tx = None;
                }
                let to_send = tx.is_some() && q.sent < q.reports.len();
                let broke = tokio::select! {
                    permit = async { tx.as_ref().expect("checked").reserve().await }, if to_send => match permit {
                        Ok(p) => {
                            p.send(q.reports[q.sent].clone());
                            q.sent += 1;
                            false
                        }
                        Err(_) => true,
                    },
                    m = arx.recv(), if !input_done => {
                        match m {
                            Some(m) => q.push(m),
                            None => input_done = true,
                        }
                        false
                    }
                    a = stream.message() => match a {
                        Ok(Some(a)) => {
                            q.ack(&a);
                            false
                        }
                        Ok(None) => true,
                        Err(s) => {
                            tracing::warn!(error = %s.message(), "metrics stream to the coordinator broke; reconnecting");
                            true
                        }
                    },
                    () = tokio::time::sleep_until(until), if give_up.is_some() => true,
                };
                if broke {
                    break;
                }
            }
        }
        // Keep taking reports during the pause before the next stream.
        let pause = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                m = arx.recv(), if !input_done => match m {
                    Some(m) => q.push(m),
                    None => input_done = true,
                },
            }
        }
    }
}

/// A step's report as the coordinator's message.
pub(super) fn to_pb(worker_id: &str, r: StepReport) -> pb::StepMetrics {
    let s = r.stats;
    pb::StepMetrics {
        worker_id: worker_id.to_string(),
        generation: r.generation,
        step: s.step,
        loss: s.loss,
        mgem: s.mgem,
        contrastive: s.contrastive,
        gepc: s.gepc,
        grad_norm: s.grad_norm,
        lr: s.lr,
        cells_per_s: s.cells_per_s,
        data_wait_s: s.data_wait_s,
        allreduce_s: s.allreduce_s,
        allreduce_wait_s: s.allreduce_wait_s,
        step_s: s.compute_s + s.data_wait_s,
        epoch: r.epoch,
        val_loss: r.val_loss.unwrap_or(f64::NAN),
        offset: r.offset,
        step_cells: r.step_cells,
        rank: r.rank as u32,
        world_size: r.world as u32,
        total_steps: r.total_steps,
    }
}
