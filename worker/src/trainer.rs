//! The training loop of one worker: data, model, optimizer, evaluation, checkpoints,
//! resume. A single-process run uses [`LocalCollective`]; a cluster worker passes its ring
//! (see `dist.rs`) and the loop stays the same.

use std::sync::Arc;
use std::time::Instant;

use scfm_common::config::TrainSpec;
use scfm_common::config::model::GepcTarget;
use scfm_common::rng::derive_seed;
use scfm_common::runtime::Rt;
use scfm_common::storage::{Store, sha256_hex};
use scfm_common::tokenizer::Batch;
use scfm_common::tokenizer::Tokenizer;
use serde::Serialize;
use tch::{Device, Kind, nn};

use crate::checkpoint::TrainState;
use crate::collective::{Collective, LocalCollective};
use crate::control::Control;
use crate::data::gene_stats::{GeneScale, SAMPLE_CELLS, SAMPLE_RUN, gene_stats};
use crate::data::{
    Blocks, CellSource, Keyed, LoaderConfig, OrderConfig, SampleOrder, StepData, batch_of,
    open_source, stream,
};
use crate::error::{Result, WorkerError};
use crate::model::{Inputs, ScfmModel};
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm};
use crate::overlap::{AllReduceTimes, Buckets};
use crate::params::FlatParams;
use crate::step::{all_reduce_grads, compute_kind, forward_backward, select_device};
use crate::upload::Uploader;
use scfm_common::checkpoint::discard_all;
use scfm_common::config::run_settings;
use scfm_common::data::prepared::data_identity;
use scfm_common::metrics_log::{MetricsLog, PartWriter, Record};

mod checkpoints;
mod elastic;
mod run;

pub use run::RunSummary;

/// Command-line options of a training run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest checkpoint that verifies (an error when there is none).
    pub resume: bool,
    /// Continue from this checkpoint directory (the coordinator's choice).
    pub resume_dir: Option<String>,
    /// Discard the checkpoints at the checkpoint URL before starting.
    pub fresh: bool,
    /// Stop this process after this many steps (the schedule still spans the whole run):
    /// simulates a preemption.
    pub stop_after: Option<u64>,
    /// Print one JSON line per step on stdout.
    pub json: bool,
}

/// Metrics of one optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    /// Step number (1-based, after the update).
    pub step: u64,
    /// The workers agreed to stop after this step (preemption).
    #[serde(skip)]
    pub stop: bool,
    /// The workers agreed to leave for the next generation after this step.
    #[serde(skip)]
    pub reform: bool,
    /// Weighted total loss (mean over micro-batches).
    pub loss: f64,
    /// MGEM loss.
    pub mgem: f64,
    /// NT-Xent loss.
    pub contrastive: f64,
    /// GEPC decoder loss (mean squared error; 0 without the decoder).
    pub gepc: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Seconds spent waiting for data.
    pub data_wait_s: f64,
    /// Seconds of compute (forward, backward, all-reduce, update).
    pub compute_s: f64,
    /// Seconds of the gradient all-reduce.
    pub allreduce_s: f64,
    /// Seconds the step waited for the gradient all-reduce: all of it when it runs after
    /// the backward pass; overlapped, the part the backward pass did not hide plus the
    /// hand-off to the communication thread.
    pub allreduce_wait_s: f64,
    /// Cells per second for this step (including data wait).
    pub cells_per_s: f64,
    /// Tokens per sequence the step's batch is padded to: its longest view, `[CLS]`
    /// included (the mean over micro-batches). With `training.length_groups` the encoder
    /// pads each group of rows only to that group's longest.
    pub padded_len: f64,
}

/// A training run in one process.
pub struct Trainer {
    /// The resolved configuration.
    pub spec: TrainSpec,
    /// The model.
    pub model: ScfmModel,
    /// Flat parameters and gradients.
    pub params: FlatParams,
    /// Optimizer.
    pub opt: AdamW,
    /// Progress state (saved in checkpoints).
    pub state: TrainState,
    /// Total optimizer steps of the run (the schedule's length).
    pub total_steps: u64,
    source: Arc<dyn CellSource>,
    order: SampleOrder,
    store: Store,
    /// The process's runtime (storage calls block on it from this thread).
    rt: Rt,
    /// Stop, re-form and end requests.
    control: Control,
    _vs: nn::VarStore,
    device: Device,
    /// The metrics log a single process writes (a cluster's coordinator writes its own).
    log: Option<Arc<MetricsLog>>,
    /// `(validation loss, step)` of the best evaluation that was checkpointed.
    best: Option<(f64, u64)>,
    ctx: WorkerContext,
    uploader: Uploader,
    /// A state synchronisation failed half-way: the parameters may be a mix.
    tainted: bool,
    /// The vocabulary as `vocab.tsv` (a checkpoint part).
    vocab_tsv: bytes::Bytes,
    /// What the GEPC targets are standardised by (`model.gepc_target: scaled`).
    gepc_scale: Option<GeneScale>,
    /// The gradient buckets of the overlapped all-reduce.
    buckets: Buckets,
}

/// How this trainer fits in a cluster.
pub struct WorkerContext {
    /// Collective over the workers of the current generation.
    pub collective: Box<dyn Collective>,
    /// Where per-step metrics go (the coordinator stream); `None` for a single process,
    /// which writes its metrics log itself.
    pub reporter: Option<std::sync::mpsc::Sender<StepReport>>,
    /// Check identical parameters across workers every this many steps.
    pub checksum_every: u64,
    /// Membership generation of the collective (0 for a single process).
    pub generation: u64,
    /// In a cluster: the check rank 0 makes before writing a checkpoint, that the
    /// coordinator has not formed a newer generation without this worker.
    pub fence: Option<crate::fence::Fence>,
    /// All-reduce gradient buckets during the backward pass (`cluster.overlap_allreduce`).
    pub overlap: bool,
}

impl WorkerContext {
    /// A single process: world size 1, no reporting.
    pub fn single() -> Self {
        WorkerContext {
            collective: Box::new(LocalCollective::new()),
            reporter: None,
            checksum_every: u64::MAX,
            generation: 0,
            fence: None,
            overlap: false,
        }
    }
}

/// What a worker reports to the coordinator after each step.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Step statistics.
    pub stats: StepStats,
    /// Epoch of the step.
    pub epoch: u64,
    /// Membership generation that ran the step.
    pub generation: u64,
    /// Validation loss when evaluated at this step.
    pub val_loss: Option<f64>,
    /// The step's place in the data stream: `epoch * n_train + position` at its start.
    pub offset: u64,
    /// Cells of the step over all workers.
    pub step_cells: u64,
    /// This worker's rank and the world size of the step.
    pub rank: usize,
    /// World size of the step.
    pub world: usize,
    /// Steps of the whole run as planned now (it changes with the world size).
    pub total_steps: u64,
}

/// Lines of the metrics log a single process holds at most before writing them as a part
/// (it also writes them after each checkpoint).
const LOG_PART_LINES: usize = 10_000;

fn model_json(spec: &TrainSpec) -> serde_json::Value {
    serde_json::to_value(&spec.model).expect("model config serializes")
}

impl Trainer {
    /// A single-process trainer with a runtime of its own and no stop requests (tests and
    /// benchmarks; a binary uses [`Trainer::with_runtime`]).
    pub fn new(spec: TrainSpec, opts: &RunOptions) -> Result<Self> {
        let rt = Rt::new().map_err(|e| WorkerError::Internal(format!("tokio runtime: {e}")))?;
        Self::with_runtime(spec, opts, &rt, &Control::new())
    }

    /// A single-process trainer on the process's runtime `rt`, stopped by `control`.
    pub fn with_runtime(
        spec: TrainSpec,
        opts: &RunOptions,
        rt: &Rt,
        control: &Control,
    ) -> Result<Self> {
        Self::with_context(spec, opts, WorkerContext::single(), rt, control)
    }

    /// Loads the data, builds the model, and resumes when asked; storage calls block on
    /// `rt`, and `control` says when to stop, re-form or leave.
    pub fn with_context(
        spec: TrainSpec,
        opts: &RunOptions,
        ctx: WorkerContext,
        rt: &Rt,
        control: &Control,
    ) -> Result<Self> {
        let t = &spec.training;
        tch::set_num_threads(
            t.threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                as i32,
        );
        let device = select_device(t.device)?;
        let source = open_source(&spec.data, rt)?;
        let n_genes = source.n_genes();
        let source_vocab = source.vocab();
        let order = SampleOrder::new(
            &source.shard_cells(),
            OrderConfig {
                seed: t.seed,
                validation_fraction: spec.data.validation_fraction,
                block_cells: spec.data.block_cells,
                window_units: spec.data.shuffle_window,
            },
        );
        tracing::info!(data = %source.describe(), genes = n_genes, train = order.n_train(), val = order.validation().len(), "data opened");
        let gepc_scale = if spec.model.has_gepc() && spec.model.gepc_target == GepcTarget::Scaled {
            let t0 = Instant::now();
            let st = gene_stats(source.as_ref(), SAMPLE_CELLS, SAMPLE_RUN)?;
            tracing::info!(
                cells = st.n_cells,
                digest = %st.digest(),
                seconds = t0.elapsed().as_secs_f64(),
                "GEPC targets standardised by the genes' mean and std on a sample of the data"
            );
            Some(GeneScale::new(&st, spec.model.gepc_clip, device))
        } else {
            None
        };

        tch::manual_seed(derive_seed(t.seed, &[0]) as i64);
        let vs = nn::VarStore::new(device);
        let mut model = ScfmModel::new(&vs, &spec.model, n_genes)?;
        let compute = compute_kind(t.precision, device);
        model.set_compute_kind(compute);
        model.set_length_groups(spec.training.length_groups);
        tracing::info!(precision = ?compute.unwrap_or(Kind::Float), "compute precision");
        let mut params = FlatParams::new(&vs);
        params.attach_grads();
        tracing::info!(
            parameters = params.numel(),
            "model built ({} parameters)",
            params.numel()
        );
        eprintln!(
            "scfm model: {} parameters ({} genes, hidden {}, {} layers)",
            params.numel(),
            n_genes,
            spec.model.hidden,
            spec.model.n_layers
        );
        let mut opt = AdamW::new(
            AdamWConfig {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
            },
            &params,
        );
        opt.set_lr_scale(
            &params.ranges_where(|n| n.starts_with("gepc.")),
            t.decoder_lr_scale,
        );
        let lcfg = loader_config(&spec, &ctx);
        let n_train = order.n_train();
        if n_train < lcfg.cells_per_step() {
            return Err(WorkerError::Common(scfm_common::Error::config(
                "training.batch_size",
                format!(
                    "{n_train} training cells are fewer than one step's {} cells",
                    lcfg.cells_per_step()
                ),
            )));
        }
        let rt = rt.clone();
        let identity = rt.block_on(data_identity(&spec.data.path))?;
        let settings = run_settings(&spec.model, &spec.data, &identity, t);
        let digest = sha256_hex(settings.to_string().as_bytes());
        let state = TrainState {
            step: 0,
            epoch: 0,
            position: 0,
            seed: t.seed,
            config_digest: digest,
            best_val: None,
            evals_since_best: 0,
            val_loss: None,
            model: model_json(&spec),
            n_genes,
            settings,
        };
        let store = Store::open(&spec.checkpoint.url)?;
        // The end of a single-process run waits for its last checkpoint as long as one
        // store operation is retried; a cluster worker waits its preemption grace
        // (`set_checkpoint_grace`).
        let uploader = Uploader::new(store.retry_window(), rt.clone());
        if opts.fresh {
            let n = rt.block_on(discard_all(&store))?;
            tracing::info!(url = %store.url(), objects = n, "--fresh: discarded earlier checkpoints");
        }
        let log = if ctx.reporter.is_none() {
            let (writer, _) = rt.block_on(PartWriter::open(store.clone()))?;
            Some(Arc::new(MetricsLog::new(writer)))
        } else {
            None
        };
        let buckets = Buckets::new(&params, model.cfg.n_layers);
        let mut tr = Trainer {
            spec,
            model,
            params,
            opt,
            state,
            total_steps: 0,
            source,
            order,
            store,
            rt,
            control: control.clone(),
            _vs: vs,
            device,
            log,
            best: None,
            ctx,
            uploader,
            tainted: false,
            vocab_tsv: bytes::Bytes::from(scfm_common::data::prepared::vocab_tsv(&source_vocab)),
            gepc_scale,
            buckets,
        };
        if opts.resume || opts.resume_dir.is_some() {
            tr.resume(opts.resume_dir.as_deref())?;
        }
        // Lines of later steps that an earlier process wrote no longer count.
        if let Some(log) = &tr.log
            && tr.rt.block_on(log.max_step()) > tr.state.step
        {
            log.push(&Record::Rollback {
                to_step: tr.state.step,
                generation: 0,
                reason: "resume".into(),
            });
        }
        tr.total_steps = tr.plan_total_steps();
        Ok(tr)
    }

    /// The vocabulary size when the model has the GEPC decoder (its targets are dense over
    /// the vocabulary), else `None` (no targets built).
    fn gepc_genes(&self) -> Option<usize> {
        self.model.cfg.has_gepc().then_some(self.model.n_genes)
    }

    /// A batch as model inputs on the device, with its GEPC targets (standardised when the
    /// model says so).
    fn inputs(&self, b: &Batch) -> Inputs {
        let mut x = Inputs::from_batch_with_profiles(b, self.device, self.gepc_genes());
        if let Some(scale) = &self.gepc_scale {
            x.profile = x.profile.map(|p| scale.apply(&p));
        }
        x
    }

    /// Runs one optimizer step on `data`.
    pub fn train_step(&mut self, data: &StepData) -> Result<StepStats> {
        let t = &self.spec.training;
        let step = self.state.step;
        let start = Instant::now();
        self.params.zero_grad();
        let inputs: Vec<Inputs> = data.micro.iter().map(|b| self.inputs(b)).collect();
        let l = forward_backward(
            &self.model,
            &inputs,
            t.seed,
            step,
            self.control.stop_requested(),
            self.control.reform_requested(self.ctx.generation),
            self.ctx.collective.as_mut(),
            self.ctx
                .overlap
                .then_some((&self.buckets, &self.params.grad)),
        )?;
        let (loss, mgem, con) = (l.total, l.mgem, l.contrastive);
        if !loss.is_finite() {
            return Err(WorkerError::Training {
                step: step + 1,
                message: format!("loss is {loss} (mgem {mgem}, contrastive {con})"),
            });
        }
        let allreduce = match l.overlapped {
            Some(t) => t,
            None => {
                let s = all_reduce_grads(&self.params, self.ctx.collective.as_mut())?;
                AllReduceTimes {
                    busy_s: s,
                    wait_s: s,
                }
            }
        };
        let grad_norm = clip_grad_norm(&self.params, t.clip_grad_norm);
        let lr = t.lr_at(step, self.total_steps);
        self.wait_snapshot();
        self.opt.update(&self.params, lr);
        self.state.step += 1;
        let compute_s = start.elapsed().as_secs_f64();
        let cells = data.micro.iter().map(|b| b.n / 2).sum::<usize>();
        let padded_len =
            data.micro.iter().map(|b| b.len).sum::<usize>() as f64 / data.micro.len().max(1) as f64;
        Ok(StepStats {
            step: self.state.step,
            loss,
            mgem,
            contrastive: con,
            gepc: l.gepc,
            grad_norm,
            lr,
            data_wait_s: 0.0,
            compute_s,
            allreduce_s: allreduce.busy_s,
            allreduce_wait_s: allreduce.wait_s,
            cells_per_s: cells as f64 / compute_s,
            padded_len,
            stop: l.stop,
            reform: l.reform,
        })
    }

    /// Mean losses `(total, mgem, contrastive)` over the validation cells (deterministic views).
    /// With several workers each evaluates every `world`-th chunk and the sums are
    /// all-reduced, so all workers get the same figures.
    pub fn evaluate(&mut self) -> Result<Option<(f64, f64, f64)>> {
        let t = &self.spec.training;
        let n = self.order.validation().len().min(t.max_eval_cells);
        if n < 2 {
            return Ok(None);
        }
        let (rank, world) = (self.ctx.collective.rank(), self.ctx.collective.world_size());
        let tok = Tokenizer::new(&self.spec.model);
        let (mut tot, mut mg, mut co, mut w) = (0.0, 0.0, 0.0, 0.0);
        let mut blocks = Blocks::new(self.source.clone(), self.spec.data.block_cells, 8);
        let val: Vec<Keyed> = self.order.validation()[..n]
            .iter()
            .map(|&c| (0, c))
            .collect();
        tch::no_grad(|| -> Result<()> {
            for (ci, chunk) in val.chunks(t.batch_size).enumerate() {
                if chunk.len() < 2 || ci % world != rank {
                    continue;
                }
                let b = batch_of(
                    &mut blocks,
                    chunk,
                    &tok,
                    &t.augment,
                    t.seed,
                    stream::EVAL,
                    1,
                )?;
                let l = self.model.losses(&self.inputs(&b), false);
                let c = chunk.len() as f64;
                tot += l.total.double_value(&[]) * c;
                mg += l.mgem * c;
                co += l.contrastive * c;
                w += c;
            }
            Ok(())
        })?;
        let mut sums = [tot, mg, co, w];
        self.ctx.collective.all_reduce_sum_f64(&mut sums)?;
        let [tot, mg, co, w] = sums;
        Ok((w > 0.0).then(|| (tot / w, mg / w, co / w)))
    }

    /// Appends a line to the metrics log (single process); a long run between checkpoints
    /// writes a part every [`LOG_PART_LINES`] lines, so memory stays bounded.
    fn log_record(&self, r: &Record) {
        let Some(log) = &self.log else { return };
        log.push(r);
        if log.pending() >= LOG_PART_LINES
            && let Err(e) = self.rt.block_on(log.flush())
        {
            tracing::warn!(error = %e, "could not write the metrics log (kept, and tried again)");
        }
    }
}

/// The loader's settings for this worker's place in the job.
fn loader_config(spec: &TrainSpec, ctx: &WorkerContext) -> LoaderConfig {
    let t = &spec.training;
    LoaderConfig {
        seed: t.seed,
        batch_size: t.batch_size,
        grad_accum: t.grad_accum,
        augment: t.augment.clone(),
        prefetch: 4,
        block_cells: spec.data.block_cells,
        window_units: spec.data.shuffle_window,
        threads: spec.data.loader_threads,
        rank: ctx.collective.rank(),
        world: ctx.collective.world_size(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scfm_common::config::ModelConfig;
    use scfm_common::tokenizer::Batch;

    fn toy_batch(offset: i64) -> Batch {
        let (n, len) = (4, 5);
        let mut b = Batch {
            n,
            len,
            ..Default::default()
        };
        for r in 0..n as i64 {
            for i in 0..len as i64 {
                let g = if i == 0 {
                    1
                } else {
                    2 + (r * 3 + i + offset) % 20
                };
                b.genes.push(g);
                let bin = if i == 0 { 0 } else { 1 + (g % 9) };
                b.target_bins.push(bin);
                b.masked.push(i == 2);
                b.input_bins.push(if i == 2 { 11 } else { bin });
                b.input_values.push(0.0);
                b.target_values.push(0.0);
            }
        }
        b
    }

    /// Gradient accumulation: k micro-batches give the mean of their gradients.
    #[test]
    fn accumulation_averages_micro_batch_gradients() {
        let y = "hidden: 16\nn_layers: 1\nn_heads: 2\nffn_dim: 32\nmax_seq_len: 8\nn_bins: 11\ndropout: 0.0";
        let cfg = ModelConfig::from_spec(&serde_norway::from_str(y).unwrap()).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = ScfmModel::new(&vs, &cfg, 24).unwrap();
        let mut p = FlatParams::new(&vs);
        p.attach_grads();
        let a = Inputs::from_batch(&toy_batch(0), Device::Cpu);
        let b = Inputs::from_batch(&toy_batch(7), Device::Cpu);
        let grad_of = |micro: &[&Inputs]| {
            p.zero_grad();
            let owned: Vec<Inputs> = micro
                .iter()
                .map(|x| Inputs {
                    genes: x.genes.shallow_clone(),
                    bins: x.bins.shallow_clone(),
                    values: x.values.shallow_clone(),
                    masked: x.masked.shallow_clone(),
                    target_bins: x.target_bins.shallow_clone(),
                    target_values: x.target_values.shallow_clone(),
                    profile: x.profile.as_ref().map(|t| t.shallow_clone()),
                    detected: x.detected.as_ref().map(|t| t.shallow_clone()),
                })
                .collect();
            let l = forward_backward(
                &model,
                &owned,
                0,
                0,
                false,
                false,
                &mut LocalCollective::new(),
                None,
            )
            .unwrap();
            (l.total, p.grad.copy())
        };
        let (la, ga) = grad_of(&[&a]);
        let (lb, gb) = grad_of(&[&b]);
        let (lab, gab) = grad_of(&[&a, &b]);
        assert!((lab - (la + lb) / 2.0).abs() < 1e-6);
        assert!(gab.allclose(&((ga + gb) / 2.0), 1e-5, 1e-7, false));
    }
}
