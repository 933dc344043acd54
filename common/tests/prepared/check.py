"""Checks a prepared dataset against what Python anndata/scanpy read from its inputs
(common/src/data/prepared/tests.rs).

Usage: python check.py SPEC.json, where SPEC is
  {"out": DIR, "inputs": [{"path": PATH, "reader": "h5ad" | "10x_h5" | "10x_mtx"}, ...],
   "min_genes": N, "make_unique": bool}

The expected dataset is built independently here: each input read with anndata/scanpy,
gene names made unique when asked, the union of the genes in input order as vocabulary,
cells with fewer than `min_genes` expressed genes removed (sc.pp.filter_cells), columns
mapped to the vocabulary, cells with no vocabulary gene dropped, inputs concatenated.
Every shard must open with anndata.read_h5ad, and the concatenated shards must equal the
expected counts exactly, with the same cell names, gene names, gene symbols and sources;
dataset.json must list each shard's size and sha256; X is stored as byte-shuffled LZF
(prepare's default codec).
"""

import hashlib
import json
import os
import sys
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

warnings.simplefilter("ignore")


def read(inp, make_unique):
    r = inp["reader"]
    if r == "h5ad":
        a = ad.read_h5ad(inp["path"])
    elif r == "10x_h5":
        a = sc.read_10x_h5(inp["path"])
    else:
        a = sc.read_10x_mtx(inp["path"])
    if make_unique:
        a.var_names_make_unique()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    return a


def main():
    spec = json.load(open(sys.argv[1]))
    out = spec["out"]
    adatas = [read(i, spec["make_unique"]) for i in spec["inputs"]]
    # Cell names are made unique over all inputs in order, before any filter, as anndata
    # makes the names of the concatenation unique.
    unique = ad.utils.make_index_unique(
        pd.Index([n for a in adatas for n in a.obs_names])
    )
    start = 0
    for a in adatas:
        a.obs_names = unique[start : start + a.n_obs]
        start += a.n_obs
    vocab, seen = [], set()
    for a in adatas:
        for g in a.var_names:
            if g not in seen:
                seen.add(g)
                vocab.append(g)
    index = {g: i for i, g in enumerate(vocab)}
    blocks, names, sources = [], [], []
    for inp, a in zip(spec["inputs"], adatas):
        keep = np.asarray((a.X > 0).sum(axis=1)).ravel() >= spec["min_genes"]
        a = a[keep].copy()
        cols = np.array([index[g] for g in a.var_names])
        x = a.X.tocoo()
        m = sp.csr_matrix((x.data, (x.row, cols[x.col])), shape=(a.n_obs, len(vocab)))
        nonempty = np.diff(m.indptr) > 0
        blocks.append(m[nonempty])
        names += list(a.obs_names[nonempty])
        sources += [os.path.basename(inp["path"].rstrip("/"))] * int(nonempty.sum())
    want = sp.vstack(blocks).tocsr()
    want.sort_indices()

    meta = json.load(open(os.path.join(out, "dataset.json")))
    shards = []
    for s in meta["shards"]:
        p = os.path.join(out, s["path"])
        raw = open(p, "rb").read()
        assert hashlib.sha256(raw).hexdigest() == s["sha256"], f"{p}: sha256"
        assert len(raw) == s["bytes"], f"{p}: size"
        a = ad.read_h5ad(p)
        assert a.n_obs == s["n_cells"], f"{p}: {a.n_obs} cells, dataset.json {s['n_cells']}"
        assert sp.issparse(a.X) and a.X.format == "csr", f"{p}: X is {type(a.X)}"
        assert a.X.dtype == np.float32
        with h5py.File(p, "r") as f:  # the default codec: byte-shuffled LZF
            for name in ("X/data", "X/indices"):
                d = f[name]
                assert (d.compression, d.shuffle) == ("lzf", True), (p, name, d.compression)
        shards.append(a)
    got = ad.concat(shards, merge="same")
    assert list(got.var_names) == vocab, "vocabulary (var names) differs"
    assert got.n_obs == meta["n_cells"] == want.shape[0], (got.n_obs, meta["n_cells"], want.shape)
    assert list(got.obs_names) == names, "cell names differ"
    assert list(got.obs["source"]) == sources, "sources differ"
    gx = sp.csr_matrix(got.X)
    gx.sort_indices()
    assert (gx != want).nnz == 0, "counts differ"
    assert np.array_equal(gx.indptr, want.indptr) and np.array_equal(gx.indices, want.indices)
    assert meta["nnz"] == want.nnz
    vt = open(os.path.join(out, "vocab.tsv")).read().splitlines()
    assert vt[0] == "token_id\tgene_id\tgene_symbol"
    assert [l.split("\t")[1] for l in vt[1:]] == vocab
    assert [int(l.split("\t")[0]) for l in vt[1:]] == list(range(2, 2 + len(vocab)))
    assert list(got.var["gene_symbols"]) == [l.split("\t")[2] for l in vt[1:]]
    symbols = dict(zip(got.var_names, got.var["gene_symbols"]))
    for a in adatas:
        if "gene_symbols" in a.var:
            for g, y in zip(a.var_names, a.var["gene_symbols"]):
                assert symbols[g] == y, f"symbol of {g}: {symbols[g]} != {y}"
    print(f"ok: {got.n_obs} cells x {len(vocab)} genes in {len(shards)} shards")


main()
