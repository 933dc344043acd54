//! Training data for one process: cells in memory, a seeded train/validation split,
//! a deterministic per-epoch order, two augmented views per cell, and a background
//! thread that builds batches ahead of the trainer.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use scfm_common::config::{Augment, ModelConfig};
use scfm_common::data::CsrMatrix;
use scfm_common::rng::Rng;
use scfm_common::tokenizer::{Batch, CellTokens, Tokenizer, cellmix};

/// Random-stream identifiers (first element of every derived stream).
pub mod stream {
    /// Train/validation split.
    pub const SPLIT: u64 = 1;
    /// Per-epoch order.
    pub const ORDER: u64 = 2;
    /// Views of a cell.
    pub const VIEW: u64 = 3;
    /// libtorch's generator (dropout), per step.
    pub const TORCH: u64 = 4;
    /// Validation views.
    pub const EVAL: u64 = 5;
}

/// Log1p-normalised cells with a seeded train/validation split.
#[derive(Debug)]
pub struct CellStore {
    /// Cells × genes, log1p-normalised.
    pub x: CsrMatrix,
    /// Training cell indices (sorted).
    pub train: Vec<usize>,
    /// Validation cell indices (sorted).
    pub val: Vec<usize>,
}

impl CellStore {
    /// Splits `x`'s cells: `round(n * val_fraction)` go to validation (at least 2 when
    /// the fraction is > 0 and there are enough cells).
    pub fn new(x: CsrMatrix, val_fraction: f64, seed: u64) -> Self {
        let n = x.n_rows;
        let mut n_val = (n as f64 * val_fraction).round() as usize;
        if val_fraction > 0.0 && n >= 8 {
            n_val = n_val.max(2);
        }
        let mut rng = Rng::new(seed, &[stream::SPLIT]);
        let val_idx = rng.sample_sorted(n, n_val.min(n));
        let mut is_val = vec![false; n];
        for &i in &val_idx {
            is_val[i] = true;
        }
        let train = (0..n).filter(|&i| !is_val[i]).collect();
        CellStore {
            x,
            train,
            val: val_idx,
        }
    }
}

/// The order of training cells in `epoch` (a permutation of `train`).
pub fn epoch_order(train: &[usize], seed: u64, epoch: u64) -> Vec<usize> {
    let mut order = train.to_vec();
    Rng::new(seed, &[stream::ORDER, epoch]).shuffle(&mut order);
    order
}

/// Builds the two-view batch for `cells`: rows `0..B` are view 0, rows `B..2B` view 1.
/// Each view's randomness comes from `(stream_id, epoch, cell, view)`, so a cell's
/// views do not depend on which batch or worker it lands in.
pub fn build_batch(
    x: &CsrMatrix,
    cells: &[usize],
    tok: &Tokenizer,
    aug: &Augment,
    seed: u64,
    stream_id: u64,
    epoch: u64,
) -> Batch {
    let mut seqs: Vec<CellTokens> = Vec::with_capacity(cells.len() * 2);
    for view in 0..2u64 {
        for (i, &c) in cells.iter().enumerate() {
            let mut rng = Rng::new(seed, &[stream_id, epoch, c as u64, view]);
            let (g, v) = x.row(c);
            let mixed;
            let (g, v) =
                if aug.cellmix_prob > 0.0 && cells.len() > 1 && rng.uniform() < aug.cellmix_prob {
                    let other =
                        cells[(i + 1 + rng.below(cells.len() as u64 - 1) as usize) % cells.len()];
                    mixed = cellmix((g, v), x.row(other), aug.cellmix_alpha as f32);
                    (&mixed.0[..], &mixed.1[..])
                } else {
                    (g, v)
                };
            seqs.push(tok.tokenize(g, v, Some(aug), true, &mut rng));
        }
    }
    Batch::collate(&seqs)
}

/// One optimizer step's worth of data.
#[derive(Debug)]
pub struct StepData {
    /// Epoch.
    pub epoch: u64,
    /// Cells of the epoch consumed before this step.
    pub position: usize,
    /// Micro-batches (gradient accumulation).
    pub micro: Vec<Batch>,
}

/// Settings of the batch producer.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Run seed.
    pub seed: u64,
    /// Cells per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Augmentations.
    pub augment: Augment,
    /// Batches built ahead.
    pub prefetch: usize,
    /// This worker's rank.
    pub rank: usize,
    /// Number of workers: each step consumes `world * batch_size * grad_accum` cells of
    /// the global order, micro-batch `m` of rank `r` taking the `batch_size` cells at
    /// `position + (m * world + r) * batch_size`.
    pub world: usize,
}

impl LoaderConfig {
    /// Cells of the global order consumed per optimizer step (all workers together).
    pub fn cells_per_step(&self) -> usize {
        self.batch_size * self.grad_accum * self.world
    }
}

/// Optimizer steps in one epoch of `n_train` cells (the incomplete tail is skipped).
pub fn steps_per_epoch(n_train: usize, cfg: &LoaderConfig) -> u64 {
    (n_train / cfg.cells_per_step()) as u64
}

/// A background thread producing [`StepData`] from `(epoch, position)` onwards, forever
/// (epoch after epoch); dropping the loader stops it.
pub struct Loader {
    rx: Option<Receiver<StepData>>,
    handle: Option<JoinHandle<()>>,
}

impl Loader {
    /// Starts producing from the cursor `(epoch, position)`.
    pub fn start(
        store: Arc<CellStore>,
        model: &ModelConfig,
        cfg: LoaderConfig,
        epoch: u64,
        position: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let tok = Tokenizer::new(model);
        let handle = std::thread::Builder::new()
            .name("scfm-loader".into())
            .spawn(move || produce(store, tok, cfg, epoch, position, tx))
            .expect("spawn loader thread");
        Loader {
            rx: Some(rx),
            handle: Some(handle),
        }
    }

    /// The next step's data (blocks until built).
    pub fn next(&self) -> Option<StepData> {
        self.rx.as_ref().and_then(|r| r.recv().ok())
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn produce(
    store: Arc<CellStore>,
    tok: Tokenizer,
    cfg: LoaderConfig,
    mut epoch: u64,
    mut position: usize,
    tx: SyncSender<StepData>,
) {
    let per_step = cfg.cells_per_step();
    loop {
        let order = epoch_order(&store.train, cfg.seed, epoch);
        while position + per_step <= order.len() {
            let micro = (0..cfg.grad_accum)
                .map(|m| {
                    let a = position + (m * cfg.world + cfg.rank) * cfg.batch_size;
                    build_batch(
                        &store.x,
                        &order[a..a + cfg.batch_size],
                        &tok,
                        &cfg.augment,
                        cfg.seed,
                        stream::VIEW,
                        epoch,
                    )
                })
                .collect();
            if tx
                .send(StepData {
                    epoch,
                    position,
                    micro,
                })
                .is_err()
            {
                return;
            }
            position += per_step;
        }
        epoch += 1;
        position = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_order_are_deterministic_partitions() {
        let x = CsrMatrix::from_dense(100, 1, &[1.0; 100]);
        let s = CellStore::new(x, 0.1, 3);
        assert_eq!((s.train.len(), s.val.len()), (90, 10));
        let mut all: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let o1 = epoch_order(&s.train, 3, 0);
        assert_eq!(o1, epoch_order(&s.train, 3, 0));
        assert_ne!(o1, epoch_order(&s.train, 3, 1));
    }

    #[test]
    fn loader_resumes_at_cursor() {
        let dense: Vec<f32> = (0..40 * 5).map(|i| (i % 7) as f32).collect();
        let store = Arc::new(CellStore::new(CsrMatrix::from_dense(40, 5, &dense), 0.0, 1));
        let model = ModelConfig::preset("minimal").unwrap();
        let cfg = LoaderConfig {
            seed: 1,
            batch_size: 4,
            grad_accum: 2,
            augment: Augment::default(),
            prefetch: 2,
            rank: 0,
            world: 1,
        };
        let a = Loader::start(store.clone(), &model, cfg.clone(), 0, 0);
        let steps: Vec<StepData> = (0..7).map(|_| a.next().unwrap()).collect();
        assert_eq!(steps[4].epoch, 0);
        assert_eq!((steps[5].epoch, steps[5].position), (1, 0)); // 40 cells / 8 per step = 5 steps
        let b = Loader::start(store, &model, cfg, 0, 24);
        let s = b.next().unwrap();
        assert_eq!((s.epoch, s.position), (0, 24));
        assert_eq!(s.micro, steps[3].micro);
    }

    /// Two workers with batch B see, step by step, exactly the cells one worker with
    /// batch 2B sees, and the same views of them.
    #[test]
    fn ranks_split_the_global_batch() {
        let dense: Vec<f32> = (0..40 * 5).map(|i| (i % 7) as f32).collect();
        let store = Arc::new(CellStore::new(CsrMatrix::from_dense(40, 5, &dense), 0.0, 1));
        let model = ModelConfig::preset("minimal").unwrap();
        let cfg = |batch_size, rank, world| LoaderConfig {
            seed: 1,
            batch_size,
            grad_accum: 1,
            augment: Augment::default(),
            prefetch: 1,
            rank,
            world,
        };
        let one = Loader::start(store.clone(), &model, cfg(8, 0, 1), 0, 0)
            .next()
            .unwrap();
        let r0 = Loader::start(store.clone(), &model, cfg(4, 0, 2), 0, 0)
            .next()
            .unwrap();
        let r1 = Loader::start(store, &model, cfg(4, 1, 2), 0, 0)
            .next()
            .unwrap();
        let (b, b0, b1) = (&one.micro[0], &r0.micro[0], &r1.micro[0]);
        // Row i of the single batch (view 0) is row i of rank 0 for i < 4, of rank 1 after.
        let row = |x: &Batch, i: usize| {
            x.genes[i * x.len..i * x.len + x.len]
                .iter()
                .filter(|&&g| g != 0)
                .copied()
                .collect::<Vec<_>>()
        };
        for i in 0..4 {
            assert_eq!(row(b, i), row(b0, i));
            assert_eq!(row(b, i + 4), row(b1, i));
            assert_eq!(row(b, 8 + i), row(b0, 4 + i), "second views");
        }
    }
}
