"""scanpy 1.11 references for common/src/data/preprocess/tests/scanpy.rs.

usage: scanpy_reference.py CASE DATA OUT
  CASE mouse10k: QC metrics, filters, normalize_total + log1p, HVG (seurat, seurat_v3)
                 and the skmisc loess of seurat_v3, on DATA (raw counts, var['gene_symbols'])
  CASE pbmc:     HVG flavor="seurat" on raw.X of DATA (log-normalised)
Arrays are written to OUT as raw little-endian files (.f32, .f64, .i64, .u8); gene
names as text, one per line.
"""

import json
import sys
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from anndata.utils import make_index_unique
from scanpy.preprocessing._utils import _get_mean_var
from skmisc.loess import loess

warnings.simplefilter("ignore")
case, data, out = sys.argv[1:4]


def w(name, arr, dtype):
    np.ascontiguousarray(np.asarray(arr), dtype=dtype).tofile(f"{out}/{name}")


def hvg_seurat(a, prefix, **kw):
    df = sc.pp.highly_variable_genes(a, flavor="seurat", inplace=False, **kw)
    w(f"{prefix}_hv.u8", df["highly_variable"].to_numpy(), "u1")
    w(f"{prefix}_means.f64", df["means"].to_numpy(), "<f8")
    w(f"{prefix}_disp.f64", df["dispersions"].to_numpy(), "<f8")
    w(f"{prefix}_disp_norm.f64", df["dispersions_norm"].to_numpy(), "<f8")


def hvg_v3(a, prefix, n_top):
    df = sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=n_top, inplace=False)
    w(f"{prefix}_hv.u8", df["highly_variable"].to_numpy(), "u1")
    w(f"{prefix}_means.f64", df["means"].to_numpy(), "<f8")
    w(f"{prefix}_vars.f64", df["variances"].to_numpy(), "<f8")
    w(f"{prefix}_vars_norm.f64", df["variances_norm"].to_numpy(), "<f8")


if case == "pbmc":
    a = ad.read_h5ad(data).raw.to_adata()
    hvg_seurat(a, "pbmc_top", n_top_genes=100)
    hvg_seurat(a, "pbmc_cut")
    sys.exit(0)

assert case == "mouse10k", case
a = ad.read_h5ad(data)
sym = a.var["gene_symbols"].astype(str)
with open(f"{out}/symbols.txt", "w") as f:
    f.write("\n".join(sym) + "\n")
with open(f"{out}/symbols_unique.txt", "w") as f:
    f.write("\n".join(make_index_unique(pd.Index(sym))) + "\n")
a.var["mt"] = sym.str.startswith("mt-").to_numpy()
a.var["gm"] = sym.str.startswith("Gm").to_numpy()
obs, var = sc.pp.calculate_qc_metrics(
    a, qc_vars=["mt", "gm"], percent_top=None, log1p=False, inplace=False
)
w("qc_n_genes.i64", obs["n_genes_by_counts"], "<i8")
w("qc_total.f32", obs["total_counts"], "<f4")
for q in ("mt", "gm"):
    w(f"qc_total_{q}.f32", obs[f"total_counts_{q}"], "<f4")
    w(f"qc_pct_{q}.f32", obs[f"pct_counts_{q}"], "<f4")
w("qc_n_cells.i64", var["n_cells_by_counts"], "<i8")
w("qc_gene_total.f32", var["total_counts"], "<f4")
w("qc_gene_mean.f64", var["mean_counts"], "<f8")
w("qc_gene_dropout.f64", var["pct_dropout_by_counts"], "<f8")

# normalize_total on the unfiltered matrix: one cell has no counts.
b = a.copy()
sc.pp.normalize_total(b)
w("norm_all.f32", b.X.data, "<f4")

cells, _ = sc.pp.filter_cells(a.X, min_genes=20)
f = a[cells].copy()
genes, _ = sc.pp.filter_genes(f.X, min_cells=10)
f = f[:, genes].copy()
w("kept_cells.i64", np.flatnonzero(cells), "<i8")
w("kept_genes.i64", np.flatnonzero(genes), "<i8")
counts = f.copy()
totals = np.asarray(f.X.sum(axis=1)).ravel()
sc.pp.normalize_total(f)
w("norm.f32", f.X.data, "<f4")
w("norm_indptr.i64", f.X.indptr, "<i8")
sc.pp.log1p(f)
w("log.f32", f.X.data, "<f4")
ad.AnnData(f.X).write_h5ad(f"{out}/log.h5ad")

hvg_seurat(f, "seurat_top", n_top_genes=200)
hvg_seurat(f, "seurat_cut")
hvg_v3(counts, "v3", 200)
hvg_v3(a, "v3raw", 200)

# The loess inside seurat_v3, on its own.
mean, var_ = _get_mean_var(counts.X)
nc = var_ > 0
x, y = np.log10(mean[nc]), np.log10(var_[nc])
w("loess_x.f64", x, "<f8")
w("loess_y.f64", y, "<f8")
for surface in ("interpolate", "direct"):
    m = loess(x, y, span=0.3, degree=2, surface=surface)
    m.fit()
    w(f"loess_{surface}.f64", m.outputs.fitted_values, "<f8")

with open(f"{out}/meta.json", "w") as fh:
    json.dump({"median_total": float(np.median(totals)), "n_cells": int(f.n_obs)}, fh)
