//! Training data for one worker: a [`CellSource`] (prepared shards or one file in memory),
//! the deterministic global order of [`SampleOrder`] (independent of the number of
//! workers), two augmented views per cell, and a background thread that reads blocks and
//! builds this worker's batches ahead of the trainer.

pub mod cache;
pub mod gene_stats;
pub mod source;
pub mod thin;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use scfm_common::config::{Augment, ModelConfig};
pub use scfm_common::data::order::{CellRef, OrderConfig, SampleOrder, advance};
use scfm_common::rng::Rng;
use scfm_common::tokenizer::{Batch, CellTokens, Profiles, Tokenizer, cellmix};

pub use self::source::{Block, CellSource, MemorySource, PreparedSource, open_source};
use crate::error::{Result, WorkerError};

/// Random-stream identifiers (first element of every derived stream).
pub mod stream {
    pub use scfm_common::data::order::stream::{ORDER, SPLIT};
    /// Views of a cell.
    pub const VIEW: u64 = 3;
    /// libtorch's generator (dropout), per step.
    pub const TORCH: u64 = 4;
    /// Validation views.
    pub const EVAL: u64 = 5;
}

/// A cell of the stream: its epoch and address.
pub type Keyed = (u64, CellRef);

/// One cell's expressed genes and values, with the key its randomness derives from.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// Epoch and address.
    pub key: Keyed,
    /// Expressed genes (column indices).
    pub genes: &'a [u32],
    /// Their log1p-normalised values.
    pub values: &'a [f32],
    /// The cell's depth, `total counts / target_sum` (NaN when unknown): its counts are
    /// `expm1(value) * depth`.
    pub depth: f32,
    /// Those counts, when the source kept them ([`Block::counts`]).
    pub counts: Option<&'a [u32]>,
}

/// Builds the two-view batch of `rows`: rows `0..B` are view 0, rows `B..2B` view 1.
/// Each view's randomness comes from `(stream_id, epoch, shard, row, view)`, so a cell's
/// views do not depend on which batch or worker it lands in.
pub fn build_batch(
    rows: &[Row<'_>],
    tok: &Tokenizer,
    aug: &Augment,
    seed: u64,
    stream_id: u64,
) -> Batch {
    build_batch_threads(rows, tok, aug, seed, stream_id, 1)
}

/// [`build_batch`] tokenising on `threads` threads (the same batch: each cell's view only
/// depends on its own random stream).
pub fn build_batch_threads(
    rows: &[Row<'_>],
    tok: &Tokenizer,
    aug: &Augment,
    seed: u64,
    stream_id: u64,
    threads: usize,
) -> Batch {
    let jobs: Vec<(u64, usize)> = (0..2u64)
        .flat_map(|view| (0..rows.len()).map(move |i| (view, i)))
        .collect();
    let one = |&(view, i): &(u64, usize)| view_of(rows, i, view, tok, aug, seed, stream_id);
    let seqs: Vec<CellTokens> = if threads <= 1 || jobs.len() < 2 * threads {
        jobs.iter().map(one).collect()
    } else {
        let per = jobs.len().div_ceil(threads);
        std::thread::scope(|s| {
            let parts: Vec<_> = jobs
                .chunks(per)
                .map(|c| s.spawn(move || c.iter().map(one).collect::<Vec<_>>()))
                .collect();
            parts
                .into_iter()
                .flat_map(|h| h.join().expect("tokeniser thread"))
                .collect()
        })
    };
    let mut b = Batch::collate(&seqs);
    // The GEPC decoder's targets: each view's cell, whole and clean.
    b.set_profiles(Profiles::from_rows(
        (0..2).flat_map(|_| rows.iter().map(|r| (r.genes, r.values))),
    ));
    b
}

/// View `view` of row `i` of a batch.
fn view_of(
    rows: &[Row<'_>],
    i: usize,
    view: u64,
    tok: &Tokenizer,
    aug: &Augment,
    seed: u64,
    stream_id: u64,
) -> CellTokens {
    let r = &rows[i];
    let (e, c) = r.key;
    let mut rng = Rng::new(
        seed,
        &[stream_id, e, u64::from(c.shard), u64::from(c.row), view],
    );
    // Library-size augmentation first (it needs the cell's own counts), then CellMix.
    // (No draw for a cell of unknown depth: its stream stays as without the augmentation.)
    let thinned = (aug.downsample > 0.0 && r.depth.is_finite() && r.depth > 0.0)
        .then(|| {
            let p = 1.0 - aug.downsample * rng.uniform();
            thin::thin(r.genes, r.values, r.counts, r.depth, p, &mut rng)
        })
        .flatten();
    let (g, v) = match &thinned {
        Some((g, v)) => (&g[..], &v[..]),
        None => (r.genes, r.values),
    };
    let mixed;
    let (g, v) = if aug.cellmix_prob > 0.0 && rows.len() > 1 && rng.uniform() < aug.cellmix_prob {
        let o = &rows[(i + 1 + rng.below(rows.len() as u64 - 1) as usize) % rows.len()];
        mixed = cellmix((g, v), (o.genes, o.values), aug.cellmix_alpha as f32);
        (&mixed.0[..], &mixed.1[..])
    } else {
        (g, v)
    };
    tok.tokenize(g, v, Some(aug), true, &mut rng)
}

/// Decoded row blocks of a source, least recently used evicted first.
pub struct Blocks {
    src: Arc<dyn CellSource>,
    block: usize,
    cap: usize,
    map: HashMap<(u32, u32), Arc<Block>>,
    lru: VecDeque<(u32, u32)>,
    shard_cells: Vec<usize>,
    /// Blocks read from the source so far.
    pub reads: u64,
}

impl Blocks {
    /// Reads `src` in blocks of `block` rows, keeping at most `cap` blocks.
    pub fn new(src: Arc<dyn CellSource>, block: usize, cap: usize) -> Blocks {
        Blocks {
            shard_cells: src.shard_cells(),
            src,
            block: block.max(1),
            cap: cap.max(1),
            map: HashMap::new(),
            lru: VecDeque::new(),
            reads: 0,
        }
    }

    /// The blocks holding `cells` (loaded as needed) and each cell's row in its block.
    pub fn locate(&mut self, cells: &[CellRef]) -> Result<Vec<(Arc<Block>, usize)>> {
        let mut out = Vec::with_capacity(cells.len());
        for c in cells {
            let key = (c.shard, c.row / self.block as u32);
            let m = match self.map.get(&key) {
                Some(m) => {
                    let m = m.clone();
                    if let Some(i) = self.lru.iter().position(|k| *k == key) {
                        self.lru.remove(i);
                    }
                    self.lru.push_back(key);
                    m
                }
                None => {
                    let a = key.1 as usize * self.block;
                    let n = *self.shard_cells.get(c.shard as usize).ok_or_else(|| {
                        WorkerError::Internal(format!("cell of unknown shard {}", c.shard))
                    })?;
                    let m = Arc::new(self.src.read(c.shard, a, (a + self.block).min(n))?);
                    self.reads += 1;
                    while self.map.len() >= self.cap {
                        let Some(old) = self.lru.pop_front() else {
                            break;
                        };
                        self.map.remove(&old);
                    }
                    self.map.insert(key, m.clone());
                    self.lru.push_back(key);
                    m
                }
            };
            out.push((m, c.row as usize % self.block));
        }
        Ok(out)
    }
}

/// Builds the batch of `cells` reading their rows through `blocks`.
pub fn batch_of(
    blocks: &mut Blocks,
    cells: &[Keyed],
    tok: &Tokenizer,
    aug: &Augment,
    seed: u64,
    stream_id: u64,
    threads: usize,
) -> Result<Batch> {
    let refs: Vec<CellRef> = cells.iter().map(|k| k.1).collect();
    let located = blocks.locate(&refs)?;
    let rows: Vec<Row> = located
        .iter()
        .zip(cells)
        .map(|((m, r), &key)| {
            let (genes, values) = m.x.row(*r);
            Row {
                key,
                genes,
                values,
                depth: m.depth[*r],
                counts: m.row_counts(*r),
            }
        })
        .collect();
    Ok(build_batch_threads(
        &rows, tok, aug, seed, stream_id, threads,
    ))
}

/// One optimizer step's worth of data for this worker.
#[derive(Debug)]
pub struct StepData {
    /// Epoch of the step's first cell.
    pub epoch: u64,
    /// Position of the step's first cell in that epoch's order.
    pub position: usize,
    /// Micro-batches (gradient accumulation).
    pub micro: Vec<Batch>,
    /// This worker's cells of each micro-batch.
    pub cells: Vec<Vec<Keyed>>,
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
    /// Steps built ahead.
    pub prefetch: usize,
    /// Rows per block read from the source (the order's unit size).
    pub block_cells: usize,
    /// Units per shuffle window (sizes the block cache).
    pub window_units: usize,
    /// Threads tokenising each batch.
    pub threads: usize,
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

    /// Blocks the producer keeps decoded: two windows and a step's worth.
    pub fn block_cache(&self) -> usize {
        2 * self.window_units + self.cells_per_step().div_ceil(self.block_cells.max(1)) + 4
    }
}

/// A background thread producing [`StepData`] from a cursor onwards, forever (epoch after
/// epoch); dropping the loader stops it.
pub struct Loader {
    rx: Option<Receiver<std::result::Result<StepData, String>>>,
    handle: Option<JoinHandle<()>>,
}

impl Loader {
    /// Starts producing from the cursor `(epoch, position)`.
    pub fn start(
        src: Arc<dyn CellSource>,
        order: SampleOrder,
        model: &ModelConfig,
        cfg: LoaderConfig,
        epoch: u64,
        position: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let tok = Tokenizer::new(model);
        let handle = std::thread::Builder::new()
            .name("scfm-loader".into())
            .spawn(move || produce(src, order, tok, cfg, epoch, position, tx))
            .expect("spawn loader thread");
        Loader {
            rx: Some(rx),
            handle: Some(handle),
        }
    }

    /// The next step's data (blocks until built); an error names the shard or file.
    pub fn next(&self) -> Result<StepData> {
        match self.rx.as_ref().and_then(|r| r.recv().ok()) {
            Some(Ok(d)) => Ok(d),
            Some(Err(e)) => Err(WorkerError::Data(e)),
            None => Err(WorkerError::Internal("data loader stopped".into())),
        }
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

/// Shards in the order the epoch first needs them.
fn shard_order(order: &SampleOrder, epoch: u64) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    order
        .epoch_order(epoch)
        .iter()
        .filter(|c| seen.insert(c.shard))
        .map(|c| c.shard)
        .collect()
}

fn produce(
    src: Arc<dyn CellSource>,
    mut order: SampleOrder,
    tok: Tokenizer,
    cfg: LoaderConfig,
    mut epoch: u64,
    mut position: usize,
    tx: SyncSender<std::result::Result<StepData, String>>,
) {
    src.prefetch(shard_order(&order, epoch));
    let mut blocks = Blocks::new(src, cfg.block_cells, cfg.block_cache());
    let per_step = cfg.cells_per_step();
    let n_train = order.n_train();
    loop {
        let all = order.take(epoch, position, per_step);
        let built: Result<Vec<(Vec<Keyed>, Batch)>> = (0..cfg.grad_accum)
            .map(|m| {
                let a = (m * cfg.world + cfg.rank) * cfg.batch_size;
                let cells = all[a..a + cfg.batch_size].to_vec();
                let b = batch_of(
                    &mut blocks,
                    &cells,
                    &tok,
                    &cfg.augment,
                    cfg.seed,
                    stream::VIEW,
                    cfg.threads,
                )?;
                Ok((cells, b))
            })
            .collect();
        let msg = match built {
            Ok(parts) => {
                let (cells, micro) = parts.into_iter().unzip();
                Ok(StepData {
                    epoch,
                    position,
                    micro,
                    cells,
                })
            }
            Err(e) => Err(e.to_string()),
        };
        let failed = msg.is_err();
        if tx.send(msg).is_err() || failed {
            return;
        }
        (epoch, position) = advance(epoch, position, per_step, n_train);
    }
}

#[cfg(test)]
mod tests;
