"""Python side of `cargo bench -p scfm-worker --bench loader`: baselines over the same
prepared shards, in the same cell and 64-cell block order, as scfm's loader.

Started once by the bench with the prepared dataset's folder; prints one JSON line
{"ready": true, ...}, then serves one command per stdin line. Each run first opens every
shard, untimed, with h5py (`X/indptr` read whole, as scfm's reader keeps it; `X/indices`
and `X/data` sliced per block) and in anndata's backed mode (the backed matrix `X` taken
once per shard, as a user would hoist it out of a loop), and closes them after: HDF5 shares
an open dataset, and its chunk cache, between all handles of a file in a process, so one
side's decoded chunks would otherwise serve the next side reading the same blocks.

    run SIDE CELLS_FILE LIMIT
        CELLS_FILE holds the cells of one of the bench's loader runs as little-endian u32
        pairs (shard, row), in the order scfm's loader delivers them: the first BATCH
        cells are its untimed start-up batch, the rest are timed. LIMIT > 0 times only
        the first LIMIT timed cells (for the slow per-cell side). Prints one JSON line
        {"cells": N, "wall": S, "cpu": S, "check": X}: cells delivered, wall seconds
        (`time.perf_counter`), CPU seconds of this process (`time.process_time`), and a
        checksum of the work (so none of it can be skipped).
    quit
        exits (as does the end of stdin)

Sides (all single-threaded, as one loader thread):

    h5py-read      the blocks scfm's loader reads in the timed part (64 consecutive rows,
                   in the order the cells first need them): `indices[lo:hi]`,
                   `data[lo:hi]`
    h5py-norm      the same, then normalize_total(1e4) + log1p in numpy (float32)
    anndata-block  the same blocks as `X[a:a + 64]` of the hoisted backed matrix
    anndata-cells  each timed cell as `X[row]` of the hoisted backed matrix (a user's
                   shuffled loop over single cells)
    numpy-loader   the whole loader in numpy: the blocks through an LRU cache of scfm's
                   size (read + normalise on a miss), then per batch of 64 cells both
                   views vectorised over the batch: library-size thinning (a binomial draw
                   per count, keep fraction U(0.2, 1)), renormalisation, gene dropout 0.3,
                   per-view quantile bin edges (51 bins, as numpy.quantile), the top 511
                   genes (random ties), bins, 15% masking, collation into padded
                   [128, len] arrays with [CLS], and the GEPC profiles (each cell's
                   normalised row, twice) -- the work of `scfm_worker::data::build_batch`
                   with the `default` preset and augmentations, not its random streams.
"""

import argparse
import importlib.metadata
import json
import os
import sys
import time
from collections import OrderedDict

import anndata
import h5py
import numpy as np

BATCH = 64
BLOCK = 64
# `LoaderConfig::block_cache` for window 64, batch 64, block 64: two windows, a step, 4.
CACHE_BLOCKS = 2 * 64 + 1 + 4
TARGET_SUM = 1e4
# The `default` preset and the default augmentations.
MAX_SEQ_LEN = 512
N_BINS = 51
MASK_RATIO = 0.15
GENE_DROPOUT = 0.3
DOWNSAMPLE = 0.8
PAD, CLS, OFFSET = 0, 1, 2


class Shard:
    """One prepared shard, open in h5py and in anndata's backed mode."""

    def __init__(self, path: str):
        self.f = h5py.File(path, "r")
        self.indptr = self.f["X/indptr"][:].astype(np.int64)
        self.indices = self.f["X/indices"]
        self.data = self.f["X/data"]
        self.n = len(self.indptr) - 1
        # `a.X` of a backed AnnData makes a new backed dataset at every access: taken once.
        self.adata = anndata.read_h5ad(path, backed="r")
        self.X = self.adata.X

    def close(self):
        self.X = None
        self.adata.file.close()
        self.f.close()

    def rows(self, b: int):
        """Rows of block `b`: (a, e, lo, hi)."""
        a = b * BLOCK
        e = min(a + BLOCK, self.n)
        return a, e, int(self.indptr[a]), int(self.indptr[e])

    def read(self, b: int):
        """Block `b` as (indptr from 0, indices, counts float32)."""
        a, e, lo, hi = self.rows(b)
        ind = self.indices[lo:hi]
        dat = self.data[lo:hi].astype(np.float32, copy=False)
        return self.indptr[a : e + 1] - lo, ind, dat


def normalise(indptr: np.ndarray, counts: np.ndarray):
    """normalize_total(TARGET_SUM) + log1p per row (float32); also each row's depth."""
    lens = np.diff(indptr)
    row = np.repeat(np.arange(len(lens)), lens)
    total = np.bincount(row, weights=counts, minlength=len(lens))
    depth = (total / TARGET_SUM).astype(np.float32)
    return np.log1p(counts / depth[row]), depth


def first_touched_blocks(cells: np.ndarray):
    """The blocks the timed cells (after the start-up batch) read first, in that order."""
    seen, order = set(), []
    for i, (s, r) in enumerate(cells.tolist()):
        key = (s, r // BLOCK)
        if key not in seen:
            seen.add(key)
            if i >= BATCH:
                order.append(key)
    return order


def h5py_read(shards, blocks, norm: bool):
    check = 0.0
    for s, b in blocks:
        indptr, ind, dat = shards[s].read(b)
        if norm:
            v, _ = normalise(indptr, dat)
            check += float(v[-1]) if len(v) else 0.0
        check += len(ind)
    return check


def anndata_block(shards, blocks):
    check = 0
    for s, b in blocks:
        a, e, _, _ = shards[s].rows(b)
        check += shards[s].X[a:e].nnz
    return check


def anndata_cells(shards, timed):
    check = 0
    for s, r in timed:
        check += shards[s].X[r].nnz
    return check


class Blocks:
    """Normalised blocks, least recently used evicted first (scfm's `Blocks`)."""

    def __init__(self, shards):
        self.shards = shards
        self.cache = OrderedDict()

    def get(self, s: int, b: int):
        key = (s, b)
        blk = self.cache.get(key)
        if blk is not None:
            self.cache.move_to_end(key)
            return blk
        indptr, ind, counts = self.shards[s].read(b)
        values, depth = normalise(indptr, counts)
        while len(self.cache) >= CACHE_BLOCKS:
            self.cache.popitem(last=False)
        blk = (indptr, ind, counts, values)
        self.cache[key] = blk
        return blk


def batch_of(blocks: Blocks, cells, rng):
    """The two-view batch of `cells` (B x 2 rows): a dict of arrays."""
    parts = []
    for s, r in cells:
        indptr, ind, counts, values = blocks.get(s, r // BLOCK)
        i = r % BLOCK
        lo, hi = indptr[i], indptr[i + 1]
        parts.append((ind[lo:hi], counts[lo:hi], values[lo:hi]))
    genes = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    values = np.concatenate([p[2] for p in parts])
    lens = np.array([len(p[0]) for p in parts])
    out = tokenise(genes, counts, lens, rng)
    # The GEPC decoder's targets: each view's cell, whole and clean.
    out["profile_genes"] = np.concatenate([genes, genes])
    out["profile_values"] = np.concatenate([values, values])
    out["profile_indptr"] = np.concatenate([[0], np.cumsum(np.concatenate([lens, lens]))])
    return out


def tokenise(g, c, lens, rng):
    """Both views of every cell (view 0 of all cells, then view 1), vectorised."""
    n_views = 2 * len(lens)
    g = np.concatenate([g, g])
    c = np.concatenate([c, c])
    seg = np.repeat(np.arange(n_views), np.concatenate([lens, lens]))
    # Library-size augmentation: each count kept with the view's p ~ U(1 - DOWNSAMPLE, 1), then
    # normalised again.
    p = 1.0 - DOWNSAMPLE * rng.random(n_views)
    k = rng.binomial(c.astype(np.int64), p[seg])
    total = np.bincount(seg, weights=k, minlength=n_views)
    if (total == 0).any():  # a view left without counts is the cell as it is
        k = np.where((total == 0)[seg], c.astype(np.int64), k)
        total = np.bincount(seg, weights=k, minlength=n_views)
    kept = k > 0
    g, k, seg = g[kept], k[kept], seg[kept]
    v = np.log1p(k / (total / TARGET_SUM)[seg]).astype(np.float32)
    # Gene dropout; a view that would lose every gene keeps them all.
    drop = rng.random(len(v)) < GENE_DROPOUT
    left = np.bincount(seg[~drop], minlength=n_views)
    drop &= (left > 0)[seg]
    g, v, seg = g[~drop], v[~drop], seg[~drop]
    n = np.bincount(seg, minlength=n_views)
    # Padded [views, longest]: +inf past each view's genes.
    width = int(n.max())
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    col = np.arange(len(v)) - start[seg]
    vals = np.full((n_views, width), np.inf, np.float32)
    vals[seg, col] = v
    gmat = np.zeros((n_views, width), np.int64)
    gmat[seg, col] = g
    rows = np.arange(n_views)[:, None]
    # Quantile bin edges of all the view's values (linear, as numpy.quantile; positions
    # computed as scfm's `Binner::fit` computes them).
    srt = np.sort(vals, axis=1)
    pos = (n[:, None] - 1) * np.arange(N_BINS - 1)[None, :] / (N_BINS - 2)
    lo = np.floor(pos).astype(np.int64)
    hi = np.ceil(pos).astype(np.int64)
    a, b = srt[rows, lo], srt[rows, hi]
    edges = a + (b - a) * (pos - lo).astype(np.float32)
    # The top MAX_SEQ_LEN - 1 genes, equal values in random order, kept in gene order.
    t = MAX_SEQ_LEN - 1
    if width > t:
        key = np.where(
            np.isfinite(vals), vals.astype(np.float64) + 1e-9 * rng.random(vals.shape), -np.inf
        )
        sel = np.argpartition(-key, t - 1, axis=1)[:, :t]
        sel.sort(axis=1)
    else:
        sel = np.broadcast_to(np.arange(width), (n_views, width))
    valid = sel < n[:, None]
    kg = gmat[rows, sel]
    kv = np.where(valid, vals[rows, sel], 0.0).astype(np.float32)
    # Bins: 1 + the edges strictly below (one searchsorted over all views' edges, each
    # view's shifted past the previous one's; log1p values of counts / depth are < 16).
    shift = 16.0 * np.arange(n_views, dtype=np.float64)[:, None]
    flat = (edges.astype(np.float64) + shift).ravel()
    below = np.searchsorted(flat, kv.astype(np.float64) + shift, side="left")
    bins = 1 + below - (N_BINS - 1) * rows
    # Mask max(1, round(15% of the kept genes)) positions, uniformly.
    m = valid.sum(axis=1)
    kmask = np.clip(np.floor(MASK_RATIO * m + 0.5), 1, m).astype(np.int64)
    r = rng.random(sel.shape)
    r[~valid] = 2.0
    thr = np.sort(r, axis=1)[np.arange(n_views), kmask - 1]
    masked = r <= thr[:, None]
    # Collate: [CLS] then the kept genes, padded.
    w = sel.shape[1] + 1
    out = {
        "genes": np.full((n_views, w), PAD, np.int64),
        "target_bins": np.zeros((n_views, w), np.int64),
        "target_values": np.zeros((n_views, w), np.float32),
        "masked": np.zeros((n_views, w), bool),
    }
    out["genes"][:, 0] = CLS
    out["genes"][:, 1:] = np.where(valid, kg + OFFSET, PAD)
    out["target_bins"][:, 1:] = np.where(valid, bins, 0)
    out["target_values"][:, 1:] = kv
    out["masked"][:, 1:] = masked
    out["input_bins"] = np.where(out["masked"], N_BINS, out["target_bins"])
    out["input_values"] = np.where(out["masked"], np.float32(0.0), out["target_values"])
    return out


def numpy_loader(shards, cells, rng):
    blocks = Blocks(shards)
    cells = cells.tolist()
    check = 0.0
    n_batches = len(cells) // BATCH
    # Batch 0 is the untimed start-up batch (the Rust side's first `next()`).
    batch_of(blocks, cells[:BATCH], rng)
    w, c = time.perf_counter(), time.process_time()
    for i in range(1, n_batches):
        out = batch_of(blocks, cells[i * BATCH : (i + 1) * BATCH], rng)
        check += float(out["masked"].sum()) + float(out["input_values"][:, 1].sum())
    return (n_batches - 1) * BATCH, check, time.perf_counter() - w, time.process_time() - c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", help="a prepared dataset's folder (with dataset.json)")
    args = ap.parse_args()
    with open(os.path.join(args.dataset, "dataset.json")) as f:
        manifest = json.load(f)
    paths = [os.path.join(args.dataset, s["path"]) for s in manifest["shards"]]
    for s in [Shard(p) for p in paths]:
        s.close()
    versions = {
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "anndata": importlib.metadata.version("anndata"),
    }
    print(json.dumps({"ready": True, "shards": len(paths), **versions}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        side, path, limit = parts[1], parts[2], int(parts[3])
        cells = np.fromfile(path, dtype="<u4").reshape(-1, 2).astype(np.int64)
        rng = np.random.default_rng(0)
        # What to read is worked out before the clocks start (the Rust side does the same).
        blocks = first_touched_blocks(cells)
        timed = cells[BATCH:].tolist()
        if limit > 0:
            timed = timed[:limit]
        n = len(cells) - BATCH
        shards = [Shard(p) for p in paths]
        w, c = time.perf_counter(), time.process_time()
        if side == "numpy-loader":
            n, check, wall, cpu = numpy_loader(shards, cells, rng)
        else:
            if side in ("h5py-read", "h5py-norm"):
                check = h5py_read(shards, blocks, side == "h5py-norm")
            elif side == "anndata-block":
                check = anndata_block(shards, blocks)
            elif side == "anndata-cells":
                check, n = anndata_cells(shards, timed), len(timed)
            else:
                raise SystemExit(f"unknown side {side}")
            wall, cpu = time.perf_counter() - w, time.process_time() - c
        for s in shards:
            s.close()
        print(json.dumps({"cells": n, "wall": wall, "cpu": cpu, "check": check}), flush=True)


if __name__ == "__main__":
    main()
