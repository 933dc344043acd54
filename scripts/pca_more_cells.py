"""Does PCA gain from more cells as the model does? The check behind BENCHMARKS.md's
"Pretraining on more cells than are evaluated" (issue 11).

    .venv/bin/python scripts/pca_more_cells.py DATA EXTRA [EXTRA ...] --label-key KEY

PCA-50 with the recipe ``scfm evaluate`` uses (up to 2,000 highly variable genes,
``seurat_v3`` on the counts; ``normalize_total`` 1e4, ``log1p``, ``scale`` without a clip,
50 components) fitted twice: on DATA's cells alone, and on DATA's cells together with the
EXTRA files' cells over DATA's genes (a gene an EXTRA file lacks counts zero there), as a
model is pretrained on both. Both are scored on DATA's labelled cells only: kNN label
transfer (k = 15, 5-fold stratified, ten fold assignments; cosine and Euclidean) and
k-means ARI (k = the number of labels; the mean of ``--runs`` runs, each the best of 10
restarts), as ``scfm evaluate`` scores them.
"""

from __future__ import annotations

import argparse
import warnings

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

warnings.filterwarnings("ignore")


def pca50(x: ad.AnnData) -> np.ndarray:
    x = x.copy()
    n_top = min(2000, x.n_vars)
    if n_top < x.n_vars:
        sc.pp.highly_variable_genes(x, n_top_genes=n_top, flavor="seurat_v3")
        x = x[:, x.var.highly_variable].copy()
    sc.pp.normalize_total(x, target_sum=1e4)
    sc.pp.log1p(x)
    sc.pp.scale(x)
    sc.pp.pca(x, n_comps=min(50, x.n_vars - 1))
    return x.obsm["X_pca"]


def counts(a: ad.AnnData, path: str, cols: np.ndarray | None = None) -> sp.csr_matrix:
    """`a`'s X (or its columns `cols`) as float32 CSR, refused unless it holds raw counts."""
    x = sp.csr_matrix(a.X if cols is None else a[:, cols].X, dtype=np.float32)
    bad = x.data[(x.data < 0) | ~np.isfinite(x.data) | (x.data != np.round(x.data))]
    if bad.size:
        raise SystemExit(f"{path}: X holds {bad.size} values that are not counts (e.g. {bad[0]}); pass raw counts")
    return x


def knn(z: np.ndarray, y: np.ndarray, metric: str) -> float:
    acc = []
    for s in range(10):
        pred = np.empty(len(y), dtype=object)
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=s).split(z, y):
            pred[te] = KNeighborsClassifier(15, metric=metric).fit(z[tr], y[tr]).predict(z[te])
        acc.append(float((pred == y).mean()))
    return float(np.mean(acc))


def kmeans(z: np.ndarray, y: np.ndarray, runs: int) -> tuple[float, float]:
    k = len(set(y))
    r = [adjusted_rand_score(y, KMeans(k, n_init=10, random_state=s).fit_predict(z)) for s in range(runs)]
    return float(np.mean(r)), float(np.std(r) / np.sqrt(runs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="the labelled .h5ad with raw counts (scored)")
    p.add_argument("extra", nargs="+", help=".h5ad files with raw counts added to the fit")
    p.add_argument("--label-key", required=True)
    p.add_argument("--runs", type=int, default=100, help="k-means runs")
    args = p.parse_args()
    data = ad.read_h5ad(args.data)
    if args.label_key not in data.obs:
        raise SystemExit(f"{args.data}: no obs column {args.label_key!r}")
    y = data.obs[args.label_key].astype(str).values
    parts = [ad.AnnData(counts(data, args.data), var=data.var[[]])]
    for f in args.extra:
        e = ad.read_h5ad(f)
        have = data.var_names.isin(e.var_names)
        if not have.any():
            raise SystemExit(f"{f}: none of {args.data}'s {data.n_vars} genes (var_names) is there")
        # The extra file's columns for DATA's genes, moved to DATA's column positions.
        m = counts(e, f, data.var_names[have])
        cols = np.flatnonzero(have)
        x = sp.csr_matrix((m.data, cols[m.indices], m.indptr), shape=(e.n_obs, data.n_vars))
        parts.append(ad.AnnData(x, var=data.var[[]]))
        print(f"{f}: {e.n_obs} cells, {have.sum()} of {args.data}'s {data.n_vars} genes")
    joint = ad.concat(parts, index_unique="-")
    for name, z in [
        (f"PCA on {data.n_obs} cells", pca50(parts[0])),
        (f"PCA on {joint.n_obs} cells", pca50(joint)[: data.n_obs]),
    ]:
        m, se = kmeans(z, y, args.runs)
        print(
            f"{name:20s} kNN cosine {knn(z, y, 'cosine'):.4f}  euclidean {knn(z, y, 'euclidean'):.4f}"
            f"  k-means ARI {m:.3f} (se {se:.3f}, {args.runs} runs)",
            flush=True,
        )


if __name__ == "__main__":
    main()
