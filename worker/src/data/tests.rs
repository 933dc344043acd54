use std::collections::HashMap;
use std::path::{Path, PathBuf};

use scfm_common::config::DataConfig;
use scfm_common::data::CsrMatrix;
use scfm_common::data::prepared::{PrepareSettings, prepare};

use super::*;

fn toy_source(n: usize) -> Arc<dyn CellSource> {
    let dense: Vec<f32> = (0..n * 5).map(|i| (i % 7) as f32).collect();
    Arc::new(MemorySource::from_matrix(CsrMatrix::from_dense(
        n, 5, &dense,
    )))
}

fn order_of(src: &Arc<dyn CellSource>, val: f64) -> SampleOrder {
    SampleOrder::new(
        &src.shard_cells(),
        OrderConfig {
            seed: 1,
            validation_fraction: val,
            block_cells: 8,
            window_units: 3,
        },
    )
}

fn cfg(batch_size: usize, grad_accum: usize, rank: usize, world: usize) -> LoaderConfig {
    LoaderConfig {
        seed: 1,
        batch_size,
        grad_accum,
        augment: Augment::default(),
        prefetch: 2,
        block_cells: 8,
        window_units: 3,
        threads: 1 + rank % 2,
        rank,
        world,
    }
}

#[test]
fn loader_resumes_at_cursor_across_epochs() {
    let src = toy_source(40);
    let model = ModelConfig::preset("minimal").unwrap();
    let order = order_of(&src, 0.0);
    let a = Loader::start(src.clone(), order.clone(), &model, cfg(4, 2, 0, 1), 0, 0);
    let steps: Vec<StepData> = (0..7).map(|_| a.next().unwrap()).collect();
    // 40 cells, 8 per step: step 5 starts epoch 1.
    assert_eq!((steps[4].epoch, steps[4].position), (0, 32));
    assert_eq!((steps[5].epoch, steps[5].position), (1, 0));
    let b = Loader::start(src, order, &model, cfg(4, 2, 0, 1), 0, 24);
    let s = b.next().unwrap();
    assert_eq!((s.epoch, s.position), (0, 24));
    assert_eq!(s.micro, steps[3].micro);
}

/// Two workers with batch B see, step by step, exactly the cells one worker with batch 2B
/// sees, and the same views of them.
#[test]
fn ranks_split_the_global_batch() {
    let src = toy_source(40);
    let model = ModelConfig::preset("minimal").unwrap();
    let order = order_of(&src, 0.0);
    let first = |c| {
        Loader::start(src.clone(), order.clone(), &model, c, 0, 0)
            .next()
            .unwrap()
    };
    let (one, r0, r1) = (
        first(cfg(8, 1, 0, 1)),
        first(cfg(4, 1, 0, 2)),
        first(cfg(4, 1, 1, 2)),
    );
    assert_eq!(one.cells[0][..4], r0.cells[0][..]);
    assert_eq!(one.cells[0][4..], r1.cells[0][..]);
    let (b, b0, b1) = (&one.micro[0], &r0.micro[0], &r1.micro[0]);
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

/// Runs `world` loaders from `cursor` for `steps` steps; returns every cell delivered,
/// and the cursor after.
fn consume(
    src: &Arc<dyn CellSource>,
    order: &SampleOrder,
    world: usize,
    batch: usize,
    cursor: (u64, usize),
    steps: usize,
) -> (Vec<Keyed>, (u64, usize)) {
    let model = ModelConfig::preset("minimal").unwrap();
    let mut out = Vec::new();
    let loaders: Vec<Loader> = (0..world)
        .map(|r| {
            Loader::start(
                src.clone(),
                order.clone(),
                &model,
                cfg(batch, 2, r, world),
                cursor.0,
                cursor.1,
            )
        })
        .collect();
    let mut c = cursor;
    for _ in 0..steps {
        for l in &loaders {
            let d = l.next().unwrap();
            assert_eq!((d.epoch, d.position), c);
            out.extend(d.cells.into_iter().flatten());
        }
        c = advance(c.0, c.1, world * batch * 2, order.n_train());
    }
    (out, c)
}

/// Each training cell of epoch 0 exactly once, validation cells never.
fn assert_epoch_exactly_once(order: &SampleOrder, seen: &[Keyed], what: &str) {
    let mut count: HashMap<CellRef, usize> = HashMap::new();
    for (e, c) in seen {
        if *e == 0 {
            *count.entry(*c).or_default() += 1;
        }
    }
    assert_eq!(
        count.len(),
        order.n_train(),
        "{what}: cells of epoch 0 seen"
    );
    assert!(count.values().all(|&n| n == 1), "{what}: a cell repeated");
    for v in order.validation() {
        assert!(
            !count.contains_key(v),
            "{what}: validation cell {v:?} trained on"
        );
    }
}

fn check_exactly_once(src: Arc<dyn CellSource>, batch: usize) {
    let order = order_of(&src, 0.05);
    let n = order.n_train();
    for world in 1..=4 {
        let per_step = world * batch * 2;
        let steps = n.div_ceil(per_step);
        let (seen, _) = consume(&src, &order, world, batch, (0, 0), steps);
        assert_epoch_exactly_once(&order, &seen, &format!("world {world}"));
        // Stop after a pseudo-random step, resume (with another world size too).
        let stop = 1 + (world * 7919) % (steps - 1);
        let (mut a, cur) = consume(&src, &order, world, batch, (0, 0), stop);
        let w2 = 1 + world % 4;
        let rest = (n - cur.1).div_ceil(w2 * batch * 2);
        let (b, _) = consume(&src, &order, w2, batch, cur, rest);
        a.extend(b);
        assert_epoch_exactly_once(&order, &a, &format!("world {world} then {w2}"));
    }
}

#[test]
fn every_cell_once_per_epoch_for_world_sizes_1_to_4_and_on_resume() {
    check_exactly_once(toy_source(203), 3);
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .join(name)
}

fn prepared(dir: &Path) -> PathBuf {
    let out = dir.join("prepared");
    let s = PrepareSettings {
        shard_cells: 2_500,
        min_genes: Some(20),
        ..PrepareSettings::default()
    };
    prepare(
        &[data("mouse10k.h5ad")],
        out.to_str().unwrap(),
        &s,
        &mut |_| {},
    )
    .unwrap();
    out
}

fn data_config(path: &Path) -> DataConfig {
    serde_norway::from_str(&format!("path: {}", path.display())).unwrap()
}

/// On a prepared real dataset (4 shards): exactly once for every world size and resume,
/// and the cells read are those of the source file, normalised.
#[test]
fn prepared_shards_exactly_once_and_equal_to_source() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepared(dir.path());
    let src = open_source(
        &data_config(&out),
        &scfm_common::runtime::Rt::new().unwrap(),
    )
    .unwrap();
    assert_eq!(src.shard_cells().len(), 4);
    check_exactly_once(src.clone(), 16);
    // Row r of shard s is cell 2500 s + r of the file, minus QC-removed cells: compare a block.
    let mem = open_source(
        &data_config(&data("mouse10k.h5ad")),
        &scfm_common::runtime::Rt::new().unwrap(),
    )
    .unwrap();
    let m = src.read(0, 0, 100).unwrap();
    let whole = mem.read(0, 0, 400).unwrap();
    let hits = (0..100)
        .filter(|&r| (0..400).any(|q| whole.x.row(q) == m.x.row(r) && whole.depth[q] == m.depth[r]))
        .count();
    assert_eq!(hits, 100);
}

#[test]
fn a_damaged_shard_is_reported_and_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepared(dir.path());
    let shard = out.join("shards/shard-000002.h5ad");
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_len(len / 2).unwrap();
    let src = open_source(
        &data_config(&out),
        &scfm_common::runtime::Rt::new().unwrap(),
    )
    .unwrap();
    assert!(src.read(0, 0, 10).is_ok());
    let e = src.read(2, 0, 10).unwrap_err().to_string();
    assert!(
        e.contains("shard-000002.h5ad") && e.contains("sha256") && e.contains("damaged"),
        "{e}"
    );
}

/// The library-size augmentation on real counts: with `downsample` the two views of a
/// cell come from differently thinned counts (fewer genes, other values), the depths the
/// source read are those of the file, and `downsample: 0` leaves the batch as before.
#[test]
fn downsampled_views_are_thinned_real_counts() {
    let src = open_source(
        &data_config(&data("pbmc68k_counts.h5ad")),
        &scfm_common::runtime::Rt::new().unwrap(),
    )
    .unwrap();
    let m = src.read(0, 0, 32).unwrap();
    assert!(m.depth.iter().all(|d| d.is_finite() && *d > 0.0));
    let rows: Vec<Row> = (0..32u32)
        .map(|r| {
            let (genes, values) = m.x.row(r as usize);
            Row {
                key: (0, CellRef { shard: 0, row: r }),
                genes,
                values,
                depth: m.depth[r as usize],
                counts: m.row_counts(r as usize),
            }
        })
        .collect();
    // Counts come back from the values and depths: integers, summing to the depth.
    for r in &rows {
        let counts: Vec<f32> = r.values.iter().map(|v| v.exp_m1() * r.depth).collect();
        assert!(
            counts.iter().all(|c| (c - c.round()).abs() < 1e-2),
            "{counts:?}"
        );
        let total: f32 = counts.iter().sum();
        assert!((total / r.depth - 1e4).abs() < 1.0);
    }
    let model = ModelConfig::preset("minimal").unwrap();
    let tok = Tokenizer::new(&model);
    let plain = Augment {
        gene_dropout: 0.0,
        downsample: 0.0,
        ..Augment::default()
    };
    let thinned = Augment {
        downsample: 0.9,
        ..plain.clone()
    };
    let a = build_batch(&rows, &tok, &plain, 3, stream::VIEW);
    let b = build_batch(&rows, &tok, &thinned, 3, stream::VIEW);
    assert_eq!(a, build_batch(&rows, &tok, &plain, 3, stream::VIEW));
    assert_eq!(b, build_batch(&rows, &tok, &thinned, 3, stream::VIEW));
    let tokens = |x: &Batch| x.genes.iter().filter(|&&g| g != 0).count();
    assert!(
        tokens(&b) < tokens(&a) * 9 / 10,
        "thinned views keep {} of {} tokens",
        tokens(&b),
        tokens(&a)
    );
    // The GEPC targets stay the clean cells.
    assert_eq!(a.profiles, b.profiles);
}
