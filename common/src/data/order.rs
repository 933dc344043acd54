//! The deterministic sample order of training, a contract users rely on: resumes and any
//! number of workers see exactly this order (docs/design.md, "Exact data parallelism").
//!
//! Cells are addressed as `(shard, row)`. A cell belongs to validation when a hash of
//! `(seed, shard, row)` falls below the validation fraction, so the split depends on
//! nothing else. The training cells of each shard are cut into **units** of
//! `block_cells` consecutive rows; the order of epoch `e` is a function of `(seed, e)`
//! only: the units are permuted, then taken `window_units` at a time and the cells of each
//! window shuffled together. Reads stay block-wise (a window touches `window_units`
//! blocks) while cells still mix across the whole dataset.
//!
//! Training consumes the epochs as one stream: position `p` of epoch `e` is followed by
//! `p + 1`, and the last cell of epoch `e` by the first of epoch `e + 1`. A step takes
//! the next `world × batch × accumulation` cells, so every cell of an epoch is used exactly
//! once whatever the number of workers, and a cursor `(epoch, position)` resumes exactly —
//! with the same or with another number of workers.

use crate::rng::{Rng, derive_seed};

/// Random-stream identifiers (first element of every derived stream) of the data order.
pub mod stream {
    /// Train/validation split.
    pub const SPLIT: u64 = 1;
    /// Per-epoch order.
    pub const ORDER: u64 = 2;
}

/// A cell of a (prepared) dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellRef {
    /// Shard index.
    pub shard: u32,
    /// Row in the shard.
    pub row: u32,
}

/// Settings of the order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrderConfig {
    /// Run seed.
    pub seed: u64,
    /// Fraction of cells held out for validation.
    pub validation_fraction: f64,
    /// Consecutive cells of a shard per unit.
    pub block_cells: usize,
    /// Units whose cells are shuffled together.
    pub window_units: usize,
}

/// Whether cell `(shard, row)` is a validation cell.
pub fn is_validation(seed: u64, shard: u32, row: u32, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let h = derive_seed(seed, &[stream::SPLIT, u64::from(shard), u64::from(row)]);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// The training cells cut into units, and the validation cells.
#[derive(Debug, Clone)]
pub struct SampleOrder {
    cfg: OrderConfig,
    /// Training cells, shard by shard, rows increasing.
    train: Vec<CellRef>,
    /// Units as ranges of `train`.
    units: Vec<(usize, usize)>,
    /// Validation cells, shard by shard, rows increasing.
    val: Vec<CellRef>,
    /// The order of one epoch, kept for the next lookups.
    cached: Option<(u64, Vec<CellRef>)>,
}

impl SampleOrder {
    /// Splits the cells of shards with `shard_cells[s]` rows each and cuts units.
    pub fn new(shard_cells: &[usize], cfg: OrderConfig) -> SampleOrder {
        let block = cfg.block_cells.max(1);
        let (mut train, mut val, mut units) = (Vec::new(), Vec::new(), Vec::new());
        for (s, &n) in shard_cells.iter().enumerate() {
            for a in (0..n).step_by(block) {
                let start = train.len();
                for row in a..(a + block).min(n) {
                    let c = CellRef {
                        shard: s as u32,
                        row: row as u32,
                    };
                    if is_validation(cfg.seed, c.shard, c.row, cfg.validation_fraction) {
                        val.push(c);
                    } else {
                        train.push(c);
                    }
                }
                if train.len() > start {
                    units.push((start, train.len()));
                }
            }
        }
        SampleOrder {
            cfg,
            train,
            units,
            val,
            cached: None,
        }
    }

    /// Training cells per epoch.
    pub fn n_train(&self) -> usize {
        self.train.len()
    }

    /// Validation cells (shard by shard, rows increasing).
    pub fn validation(&self) -> &[CellRef] {
        &self.val
    }

    /// The order of the training cells in `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<CellRef> {
        let mut units: Vec<usize> = (0..self.units.len()).collect();
        Rng::new(self.cfg.seed, &[stream::ORDER, epoch]).shuffle(&mut units);
        let mut out = Vec::with_capacity(self.train.len());
        for (k, w) in units.chunks(self.cfg.window_units.max(1)).enumerate() {
            let start = out.len();
            for &u in w {
                let (a, b) = self.units[u];
                out.extend_from_slice(&self.train[a..b]);
            }
            Rng::new(self.cfg.seed, &[stream::ORDER, epoch, k as u64 + 1])
                .shuffle(&mut out[start..]);
        }
        out
    }

    /// The `n` cells of the stream from `(epoch, position)` on, each with its epoch
    /// (crossing into the next epochs as needed).
    pub fn take(&mut self, mut epoch: u64, mut position: usize, n: usize) -> Vec<(u64, CellRef)> {
        let total = self.train.len();
        let mut out = Vec::with_capacity(n);
        if total == 0 {
            return out;
        }
        while out.len() < n {
            if position >= total {
                epoch += position as u64 / total as u64;
                position %= total;
            }
            if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                self.cached = Some((epoch, self.epoch_order(epoch)));
            }
            let order = &self.cached.as_ref().expect("set above").1;
            let k = (n - out.len()).min(total - position);
            out.extend(order[position..position + k].iter().map(|&c| (epoch, c)));
            position += k;
        }
        out
    }
}

/// The cursor after consuming `n` cells from `(epoch, position)` in epochs of `n_train`.
pub fn advance(epoch: u64, position: usize, n: usize, n_train: usize) -> (u64, usize) {
    let p = position + n;
    if n_train == 0 {
        return (epoch, p);
    }
    (epoch + (p / n_train) as u64, p % n_train)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn cfg() -> OrderConfig {
        OrderConfig {
            seed: 7,
            validation_fraction: 0.1,
            block_cells: 16,
            window_units: 4,
        }
    }

    #[test]
    fn split_and_epochs_are_deterministic_partitions() {
        let shards = [100, 37, 250];
        let o = SampleOrder::new(&shards, cfg());
        let all: HashSet<CellRef> = o.train.iter().chain(&o.val).copied().collect();
        assert_eq!(all.len(), 387);
        let frac = o.val.len() as f64 / 387.0;
        assert!((0.05..0.16).contains(&frac), "{frac}");
        let e0 = o.epoch_order(0);
        assert_eq!(e0, SampleOrder::new(&shards, cfg()).epoch_order(0));
        assert_ne!(e0, o.epoch_order(1));
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, o.train);
        // Windows mix cells of several units (and shards) yet stay within 4 units.
        let first: HashSet<(u32, u32)> = e0[..40].iter().map(|c| (c.shard, c.row / 16)).collect();
        assert!(first.len() > 1 && first.len() <= 8, "{first:?}");
    }

    #[test]
    fn the_stream_crosses_epochs_and_advance_agrees() {
        let mut o = SampleOrder::new(&[50], cfg());
        let n = o.n_train();
        let s = o.take(0, n - 3, 10);
        assert_eq!(s.iter().filter(|c| c.0 == 0).count(), 3);
        assert_eq!(
            s[3..].iter().map(|c| c.1).collect::<Vec<_>>(),
            o.epoch_order(1)[..7]
        );
        assert_eq!(advance(0, n - 3, 10, n), (1, 7));
        assert_eq!(advance(2, 0, 3 * n, n), (5, 0));
    }
}
