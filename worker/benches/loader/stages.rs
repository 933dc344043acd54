//! Where one loader thread's time goes: the loader's work done by hand, single-threaded,
//! on the cells of a loader run, with the time of each stage counted.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Result;
use scfm_common::config::ModelConfig;
use scfm_common::data::h5ad::rows::H5adRows;
use scfm_common::rng::Rng;
use scfm_common::tokenizer::{Batch, Profiles, Tokenizer};
use scfm_worker::data::{Block, Blocks, CellSource, stream, thin};

use super::{BATCH, BLOCK, loader_config, open_rows, order_of};

/// Shards read through [`H5adRows`] with the time of each stage counted.
struct Timed {
    rows: Vec<H5adRows>,
    shard_cells: Vec<usize>,
    n_genes: usize,
    read_ns: AtomicU64,
    norm_ns: AtomicU64,
}

impl CellSource for Timed {
    fn shard_cells(&self) -> Vec<usize> {
        self.shard_cells.clone()
    }
    fn n_genes(&self) -> usize {
        self.n_genes
    }
    fn vocab(&self) -> Vec<scfm_common::data::prepared::VocabEntry> {
        (0..self.n_genes)
            .map(|c| scfm_common::data::prepared::VocabEntry {
                gene_id: format!("gene{c}"),
                symbol: format!("gene{c}"),
            })
            .collect()
    }
    fn identity(&self) -> String {
        "timed".into()
    }
    fn read(&self, shard: u32, a: usize, b: usize) -> scfm_worker::Result<Block> {
        let t = Instant::now();
        let x = self.rows[shard as usize].read(a, b)?;
        let t1 = Instant::now();
        let x = Block::from_counts(x, 1e4);
        self.read_ns
            .fetch_add((t1 - t).as_nanos() as u64, Ordering::Relaxed);
        self.norm_ns
            .fetch_add(t1.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(x)
    }
    fn describe(&self) -> String {
        "timed".into()
    }
}

/// Seconds per stage for `cells` cells, single-threaded, the loader's work done by hand:
/// [read+decompress, normalise, block lookup, thinning (library-size augmentation, both
/// views), tokenise (both views), collate with the GEPC profiles], and, not part of the
/// loader's work, the thinning of the same views from counts recovered from the values
/// (`round(expm1(value) * depth)`, what the loader did before it kept the counts).
pub fn stages(
    dir: &Path,
    model: &ModelConfig,
    position: usize,
    cells: usize,
    hdf5_decoding: bool,
) -> Result<[f64; 7]> {
    let (rows, shard_cells, n_genes) = open_rows(dir, hdf5_decoding)?;
    let timed = Arc::new(Timed {
        rows,
        shard_cells,
        n_genes,
        read_ns: AtomicU64::new(0),
        norm_ns: AtomicU64::new(0),
    });
    let mut order = order_of(&timed.shard_cells);
    let src: Arc<dyn CellSource> = timed.clone();
    let cfg = loader_config();
    let mut blocks = Blocks::new(src, BLOCK, cfg.block_cache());
    let (tok, aug) = (Tokenizer::new(model), cfg.augment);
    let (mut locate, mut thinning, mut tokenise, mut collate) = (0.0, 0.0, 0.0, 0.0);
    let mut recovered = 0.0;
    for s in 0..cells / BATCH {
        let keyed = order.take(0, position + s * BATCH, BATCH);
        let t = Instant::now();
        let refs: Vec<_> = keyed.iter().map(|k| k.1).collect();
        let located = blocks.locate(&refs)?;
        let t_located = Instant::now();
        // As `data::view_of` (no CellMix: off by default): thinning, then the tokenizer,
        // on one stream per view; `kept`: from the block's counts (the loader's way), else
        // from counts recovered from the values (not the loader's work: the old way).
        let views_of = |kept: bool| {
            let mut views = Vec::with_capacity(2 * BATCH);
            for view in 0..2u64 {
                for ((m, r), (e, c)) in located.iter().zip(&keyed) {
                    let key = [stream::VIEW, *e, c.shard.into(), c.row.into(), view];
                    let mut rng = Rng::new(cfg.seed, &key);
                    let (g, v) = m.x.row(*r);
                    let p = 1.0 - aug.downsample * rng.uniform();
                    let counts = if kept { m.row_counts(*r) } else { None };
                    let thinned = thin::thin(g, v, counts, m.depth[*r], p, &mut rng);
                    views.push((thinned, rng, (g, v)));
                }
            }
            views
        };
        let t0 = Instant::now();
        std::hint::black_box(views_of(false));
        recovered += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut views = views_of(true);
        let t2 = Instant::now();
        let seqs: Vec<_> = views
            .iter_mut()
            .map(|(thinned, rng, (g, v))| match thinned {
                Some((g, v)) => tok.tokenize(g, v, Some(&aug), true, rng),
                None => tok.tokenize(g, v, Some(&aug), true, rng),
            })
            .collect();
        let t3 = Instant::now();
        let mut b = Batch::collate(&seqs);
        b.set_profiles(Profiles::from_rows(
            (0..2).flat_map(|_| located.iter().map(|(m, r)| m.x.row(*r))),
        ));
        std::hint::black_box(&b);
        locate += (t_located - t).as_secs_f64();
        thinning += (t2 - t1).as_secs_f64();
        tokenise += (t3 - t2).as_secs_f64();
        collate += t3.elapsed().as_secs_f64();
    }
    let read = timed.read_ns.load(Ordering::Relaxed) as f64 * 1e-9;
    let norm = timed.norm_ns.load(Ordering::Relaxed) as f64 * 1e-9;
    Ok([
        read,
        norm,
        locate - read - norm,
        thinning,
        tokenise,
        collate,
        recovered,
    ])
}
