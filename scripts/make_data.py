"""Lay out the small real single-cell datasets that scfm's demo and tests use.

All come from packages on PyPI (nothing is fetched from a data hub):
  * scanpy's source distribution ships real 10x test data: the 10k-cell mouse
    subset (raw counts, zarr) and the 10x CellRanger v2/v3 .h5 files;
  * scanpy's wheel ships pbmc68k_reduced.h5ad (processed values, cell-type labels).

Outputs under --out (idempotent: existing files are kept):
  mouse10k.h5ad         10,000 cells x 1,000 genes, raw counts, CSR, var index = Ensembl id
  pbmc68k_reduced.h5ad  as shipped by scanpy
  pbmc68k_counts.h5ad   the same 700 cells with raw counts (765 genes) recovered from
                        `.raw` and `obs['n_counts']`, labels in obs (`bulk_labels`)
  pbmc3k_counts.h5ad    2,700 human PBMCs (10x, raw counts, no labels) shipped in the
                        source distribution of `desc` 0.1.4.1: more blood cells to pretrain on
  baron_human.h5ad      2,142 human pancreas cells (Baron et al. 2016, raw counts, 14 cell
                        types in obs['cell_type1'], 4 donors in obs['donor']) shipped in the
                        wheel of `came` 0.1.13
  baron_mouse.h5ad      1,886 mouse pancreas cells from the same study and wheel (raw counts,
                        13 cell types in obs['cell_type1'], 2 donors in obs['donor'], mouse
                        gene symbols)
  baron_mouse_hs.h5ad   the same cells over the 11,903 mouse genes with a one-to-one human
                        ortholog (the wheel's Ensembl table), named by the human symbol and
                        with obs names prefixed `mouse:`: mouse cells a human model can read
  10x_v3.h5, 10x_v2.h5  CellRanger files as shipped
"""

import argparse
import os
import shutil
import subprocess
import sys
import tarfile

SCANPY_VERSION = "1.11.5"


def log(msg: str) -> None:
    print(f"[make_data] {msg}", file=sys.stderr)


def sdist_dir(cache: str) -> str:
    root = os.path.join(cache, f"scanpy-{SCANPY_VERSION}")
    marker = os.path.join(root, "tests", "_data", "10x-10k-subset.zarr", ".zgroup")
    if os.path.exists(marker):
        return root
    os.makedirs(os.path.join(cache, "sdist"), exist_ok=True)
    tgz = os.path.join(cache, "sdist", f"scanpy-{SCANPY_VERSION}.tar.gz")
    if not os.path.exists(tgz):
        log("downloading scanpy's source distribution (real 10x test data)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:",
             "--no-deps", f"scanpy=={SCANPY_VERSION}", "-d", os.path.dirname(tgz)],
            check=True,
        )
    prefix = f"scanpy-{SCANPY_VERSION}/tests/_data/"
    with tarfile.open(tgz) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix + "10x-10k-subset.zarr")
                   or m.name.startswith(prefix + "10x_data")]
        tar.extractall(cache, members=members, filter="data")
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data")
    ap.add_argument("--cache", default=".cache")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    mouse = os.path.join(args.out, "mouse10k.h5ad")
    v3 = os.path.join(args.out, "10x_v3.h5")
    if not (os.path.exists(mouse) and os.path.exists(v3)):
        import anndata as ad
        import numpy as np
        import scipy.sparse as sp

        root = sdist_dir(args.cache)
        data = os.path.join(root, "tests", "_data")
        a = ad.read_zarr(os.path.join(data, "10x-10k-subset.zarr"))
        X = np.asarray(a.X, dtype=np.float32)
        assert np.all(X >= 0) and np.all(X == np.round(X)), "expected raw counts"
        a.var["gene_symbols"] = a.var_names.astype(str)
        a.var_names = a.var["gene_ids"].astype(str).values
        a.var = a.var.drop(columns=["gene_ids"])
        a.X = sp.csr_matrix(X)
        tmp = mouse + ".tmp"
        a.write_h5ad(tmp, compression="gzip")
        os.replace(tmp, mouse)
        log(f"wrote {mouse}: {a.n_obs} cells x {a.n_vars} genes")
        shutil.copyfile(os.path.join(data, "10x_data", "3.0.0", "filtered_feature_bc_matrix.h5"), v3)
        shutil.copyfile(os.path.join(data, "10x_data", "1.2.0", "filtered_gene_bc_matrices_h5.h5"),
                        os.path.join(args.out, "10x_v2.h5"))

    pbmc = os.path.join(args.out, "pbmc68k_reduced.h5ad")
    if not os.path.exists(pbmc):
        import scanpy

        src = os.path.join(os.path.dirname(scanpy.__file__), "datasets", "10x_pbmc68k_reduced.h5ad")
        shutil.copyfile(src, pbmc)
        log(f"copied {pbmc}")
    counts = os.path.join(args.out, "pbmc68k_counts.h5ad")
    if not os.path.exists(counts):
        write_pbmc_counts(pbmc, counts)
    pbmc3k = os.path.join(args.out, "pbmc3k_counts.h5ad")
    if not os.path.exists(pbmc3k):
        write_pbmc3k(args.cache, pbmc3k)
    baron = os.path.join(args.out, "baron_human.h5ad")
    if not os.path.exists(baron):
        write_baron(args.cache, baron)
    baron_mouse = os.path.join(args.out, "baron_mouse.h5ad")
    baron_mouse_hs = os.path.join(args.out, "baron_mouse_hs.h5ad")
    if not (os.path.exists(baron_mouse) and os.path.exists(baron_mouse_hs)):
        write_baron_mouse(args.cache, baron_mouse, baron_mouse_hs)
    log(f"datasets ready in {args.out}/")


def pip_download(spec: str, dest: str, sdist: bool) -> str:
    """Downloads one distribution of `spec` into `dest` (once) and returns its path."""
    os.makedirs(dest, exist_ok=True)
    name, version = spec.split("==")
    found = [f for f in os.listdir(dest) if f.lower().startswith(f"{name}-{version}".lower())]
    if not found:
        log(f"downloading {spec} ({'source distribution' if sdist else 'wheel'}) for its data")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", dest]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        subprocess.run(cmd, check=True)
        found = [f for f in os.listdir(dest) if f.lower().startswith(f"{name}-{version}".lower())]
    return os.path.join(dest, found[0])


def counts_only(a, obs_cols):
    """An AnnData with integer counts in a CSR X (checked), the given obs columns, unique
    var names."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    x = sp.csr_matrix(a.X, dtype=np.float32)
    x.eliminate_zeros()
    assert x.data.min() >= 0 and np.array_equal(x.data, np.round(x.data)), "expected raw counts"
    out = ad.AnnData(X=x, obs=a.obs[obs_cols].copy(), var=a.var[[]].copy())
    out.var_names_make_unique()
    return out


def write_pbmc3k(cache: str, dst: str) -> None:
    import anndata as ad

    tgz = pip_download("desc==0.1.4.1", os.path.join(cache, "desc"), sdist=True)
    member = "desc-0.1.4.1/desc/datasets/pbmc.h5ad"
    with tarfile.open(tgz) as tar:
        tar.extract(member, cache, filter="data")
    a = counts_only(ad.read_h5ad(os.path.join(cache, member)), [])
    tmp = dst + ".tmp"
    a.write_h5ad(tmp)
    os.replace(tmp, dst)
    log(f"wrote {dst}: {a.n_obs} cells x {a.n_vars} genes, raw counts")


def came_sample(cache: str, member: str) -> str:
    """Extracts `member` of the sample data shipped in the `came` 0.1.13 wheel; its path."""
    import io
    import zipfile

    whl = pip_download("came==0.1.13", os.path.join(cache, "came"), sdist=False)
    inner = zipfile.ZipFile(io.BytesIO(zipfile.ZipFile(whl).read("came/sample_data.zip")))
    return inner.extract(member, os.path.join(cache, "came"))


def write_labelled(src: str, dst: str):
    """Writes the raw counts of `src` with its cell types and donors to `dst`; returns them."""
    import anndata as ad

    a = counts_only(ad.read_h5ad(src), ["cell_type1", "cell_ontology_class", "donor"])
    tmp = dst + ".tmp"
    a.write_h5ad(tmp)
    os.replace(tmp, dst)
    log(f"wrote {dst}: {a.n_obs} cells x {a.n_vars} genes, raw counts, "
        f"{a.obs['cell_type1'].nunique()} cell types")
    return a


def write_baron(cache: str, dst: str) -> None:
    write_labelled(came_sample(cache, "raw-Baron_human.h5ad"), dst)


def write_baron_mouse(cache: str, dst: str, dst_hs: str) -> None:
    import pandas as pd

    a = write_labelled(came_sample(cache, "raw-Baron_mouse.h5ad"), dst)
    table = came_sample(cache, "gene_matches_1v1_mouse2human.csv")
    g = pd.read_csv(table)
    g = g[g["human.homology.type"] == "ortholog_one2one"]
    to_human = dict(zip(g["gene.name"], g["human.gene.name"]))
    keep = [v for v in a.var_names if v in to_human]
    hs = a[:, keep].copy()
    hs.var_names = [to_human[v] for v in keep]
    assert hs.var_names.is_unique, "one-to-one orthologs map to distinct human genes"
    hs.obs_names = ["mouse:" + n for n in hs.obs_names]
    tmp = dst_hs + ".tmp"
    hs.write_h5ad(tmp)
    os.replace(tmp, dst_hs)
    log(f"wrote {dst_hs}: {hs.n_obs} cells x {hs.n_vars} genes named by their human ortholog")


def write_pbmc_counts(src: str, dst: str) -> None:
    """Raw counts of pbmc68k_reduced: `.raw.X` holds log1p(counts / n_counts * 1e4) of
    765 genes rounded to 3 decimals, where `n_counts` is the cell's total over all genes,
    so `expm1(raw) * n_counts / 1e4` is within rounding of an integer."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    a = ad.read_h5ad(src)
    r = a.raw.X.toarray() if sp.issparse(a.raw.X) else np.asarray(a.raw.X)
    c = np.expm1(r.astype(np.float64)) * a.obs["n_counts"].values[:, None] / 1e4
    dev = np.abs(c - np.round(c)).max()
    assert dev < 0.25, f"counts not recoverable: max distance to an integer {dev}"
    c = np.round(c).astype(np.float32)
    assert (c >= 0).all() and (c.sum(1) > 0).all()
    out = ad.AnnData(
        X=sp.csr_matrix(c),
        obs=a.obs[["bulk_labels", "louvain", "phase", "n_counts", "n_genes", "percent_mito"]].copy(),
        var=a.raw.var[[]].copy(),
    )
    tmp = dst + ".tmp"
    out.write_h5ad(tmp)
    os.replace(tmp, dst)
    log(f"wrote {dst}: {out.n_obs} cells x {out.n_vars} genes, raw counts (max rounding {dev:.3f})")


if __name__ == "__main__":
    main()
