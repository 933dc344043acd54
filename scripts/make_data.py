"""Lay out the small real single-cell datasets that scfm's demo and tests use.

All come from packages on PyPI (nothing is fetched from a data hub):
  * scanpy's source distribution ships real 10x test data: the 10k-cell mouse
    subset (raw counts, zarr) and the 10x CellRanger v2/v3 .h5 files;
  * scanpy's wheel ships pbmc68k_reduced.h5ad (processed values, cell-type labels).

Outputs under --out (idempotent: existing files are kept):
  mouse10k.h5ad         10,000 cells x 1,000 genes, raw counts, CSR, var index = Ensembl id
  pbmc68k_reduced.h5ad  as shipped by scanpy
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
    log(f"datasets ready in {args.out}/")


if __name__ == "__main__":
    main()
