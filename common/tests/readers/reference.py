"""Reference data for the reader tests (common/src/data/read/tests.rs).

Usage: python reference.py SPEC.json, where SPEC is
  {"dir": DIR, "repo": REPO_ROOT, "make": true | false,
   "dump": [{"fn": "10x_h5" | "10x_mtx" | "loom" | "csv", "path": PATH, ...args,
             "out": DIR}, ...]}

"make" writes test files into DIR from the real counts of REPO/data/10x_v3.h5 (read with
scanpy): loom files with loompy, CSV/TSV tables with pandas, a 10x mtx folder with scipy,
a 10x v3 h5 with two genomes and two feature types, and bad inputs. "dump" reads each
case with scanpy / anndata and writes to `out`: meta.json (n_rows, n_cols, obs_names,
var_names) and X as canonical CSR float32 in little-endian binaries indptr.bin (u64),
indices.bin (u32), data.bin (f32).
"""

import gzip
import json
import os
import shutil
import sys
import warnings

import anndata as ad
import h5py
import loompy
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.io
import scipy.sparse as sp

warnings.simplefilter("ignore")


def counts(repo):
    a = sc.read_10x_h5(os.path.join(repo, "data/10x_v3.h5"))
    a.X.sort_indices()
    return a


def make(d, repo):
    a = counts(repo)
    X = a.X.toarray()  # cells × genes, float32 counts
    genes = list(a.var_names)
    ids = list(a.var["gene_ids"])
    cells = list(a.obs_names)

    # loom: float32 counts; int32 counts with an escaped gene name and an odd cell count;
    # float64 normalized values.
    loompy.create(os.path.join(d, "counts.loom"), sp.csr_matrix(X.T),
                  {"Gene": np.array(genes), "Accession": np.array(ids)},
                  {"CellID": np.array(cells)})
    g2 = genes.copy()
    # Stored escaped, as loompy escapes non-ASCII text; read back as "Gén_ä&co".
    g2[3] = "G&#233;n_&#xe4;&amp;co"
    loompy.create(os.path.join(d, "int.loom"), X.T[:, :1001].astype(np.int32),
                  {"Gene": np.array(g2, dtype=object), "Accession": np.array(ids)},
                  {"CellID": np.array(cells[:1001])})
    norm = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)
    loompy.create(os.path.join(d, "norm.loom"), norm.T.astype(np.float64),
                  {"Gene": np.array(genes), "Accession": np.array(ids)},
                  {"CellID": np.array(cells)})

    # CSV/TSV from pandas.
    df = pd.DataFrame(X, index=cells, columns=genes)
    df.to_csv(os.path.join(d, "counts.csv"))
    df.to_csv(os.path.join(d, "counts.tsv"), sep="\t")
    df.to_csv(os.path.join(d, "counts.csv.gz"))
    df.iloc[:300].T.to_csv(os.path.join(d, "counts_t.tsv.gz"), sep="\t")
    pd.DataFrame(norm.astype(np.float32)[:200], index=cells[:200],
                 columns=genes).to_csv(os.path.join(d, "norm.txt"), sep="\t")
    df.iloc[:50].to_csv(os.path.join(d, "space.txt"), sep=" ")

    # 10x mtx folder (v3 layout, gzip) with real values and two feature types.
    m = os.path.join(d, "mtx_real")
    os.makedirs(m)
    types = ["Antibody Capture" if j % 50 == 7 else "Gene Expression" for j in range(len(genes))]
    scipy.io.mmwrite(os.path.join(m, "matrix.mtx"), sp.coo_matrix(norm.T.astype(np.float32)))
    with open(os.path.join(m, "matrix.mtx"), "rb") as f, \
            gzip.open(os.path.join(m, "matrix.mtx.gz"), "wb") as g:
        shutil.copyfileobj(f, g)
    os.remove(os.path.join(m, "matrix.mtx"))
    with gzip.open(os.path.join(m, "features.tsv.gz"), "wt") as f:
        f.writelines(f"{i}\t{n}\t{t}\n" for i, n, t in zip(ids, genes, types))
    with gzip.open(os.path.join(m, "barcodes.tsv.gz"), "wt") as f:
        f.writelines(c + "\n" for c in cells)

    # Legacy folder with repeated gene symbols (make_unique) and shuffled entries.
    src = os.path.join(repo, ".cache/scanpy-1.11.5/tests/_data/10x_data/1.2.0/"
                       "filtered_gene_bc_matrices/hg19_chr21")
    dup = os.path.join(d, "mtx_dup")
    shutil.copytree(src, dup)
    rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(dup, "genes.tsv"))]
    for k in (1, 2, 5):
        rows[k][1] = "APP"
    rows[3][1] = "APP-1"
    with open(os.path.join(dup, "genes.tsv"), "w") as f:
        f.writelines(f"{i}\t{n}\n" for i, n in rows)
    lines = open(os.path.join(dup, "matrix.mtx")).read().splitlines()
    body = lines[3:]
    np.random.default_rng(0).shuffle(body)
    with open(os.path.join(dup, "matrix.mtx"), "w") as f:
        f.write("\n".join(lines[:3] + body) + "\n")

    # 10x v3 h5 with two genomes and two feature types.
    h = os.path.join(d, "two_genomes.h5")
    shutil.copy(os.path.join(repo, "data/10x_v3.h5"), h)
    with h5py.File(h, "a") as f:
        feat = f["matrix/features"]
        n = feat["id"].shape[0]
        genome = np.array([b"mm10" if j % 3 == 0 else b"GRCh38" for j in range(n)])
        ftype = np.array([b"Antibody Capture" if j % 10 == 1 else b"Gene Expression"
                          for j in range(n)])
        for k, v in [("genome", genome), ("feature_type", ftype)]:
            del feat[k]
            feat.create_dataset(k, data=v)

    # Bad inputs.
    with h5py.File(os.path.join(d, "other.h5"), "w") as f:
        f.create_dataset("foo/bar", data=np.arange(3))
    with open(os.path.join(d, "data.xyz"), "w") as f:
        f.write("a,b\n1,2\n")


def dump(c, out):
    fn = c["fn"]
    if fn == "10x_h5":
        a = sc.read_10x_h5(c["path"], genome=c.get("genome"), gex_only=c.get("gex_only", True))
        if c.get("ids"):
            a.var_names = a.var["gene_ids"].astype(str)
    elif fn == "10x_mtx":
        # The reader also takes the folder's matrix file; scanpy takes the folder.
        path = os.path.dirname(c["path"]) if os.path.isfile(c["path"]) else c["path"]
        a = sc.read_10x_mtx(path, var_names=c.get("var_names", "gene_symbols"),
                            make_unique=c.get("make_unique", False),
                            gex_only=c.get("gex_only", True))
    elif fn == "loom":
        a = ad.io.read_loom(c["path"], sparse=True, var_names=c.get("var_names", "Gene"))
    elif fn == "csv":
        a = sc.read_text(c["path"], delimiter=c.get("delimiter"), first_column_names=True)
        if c.get("transpose"):
            a = a.T
    else:
        raise ValueError(fn)
    X = sp.csr_matrix(a.X, dtype=np.float32)
    X.sum_duplicates()
    X.sort_indices()
    os.makedirs(out, exist_ok=True)
    meta = {"n_rows": a.n_obs, "n_cols": a.n_vars,
            "obs_names": [str(s) for s in a.obs_names],
            "var_names": [str(s) for s in a.var_names]}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    X.indptr.astype("<u8").tofile(os.path.join(out, "indptr.bin"))
    X.indices.astype("<u4").tofile(os.path.join(out, "indices.bin"))
    X.data.astype("<f4").tofile(os.path.join(out, "data.bin"))


def main():
    spec = json.load(open(sys.argv[1]))
    if spec["make"]:
        make(spec["dir"], spec["repo"])
    for c in spec["dump"]:
        dump(c, c["out"])


if __name__ == "__main__":
    main()
