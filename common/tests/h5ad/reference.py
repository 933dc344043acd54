"""Reference data for the h5ad reader tests (common/src/data/h5ad/tests.rs).

Usage: python reference.py SPEC.json, where SPEC is
  {"dir": DIR, "make": ["synthetic" | "legacy" | "errors", ...],
   "dump": [{"file": PATH, "source": "X" | "raw" | "layer:NAME", "label": COL | null,
             "out": DIR}, ...]}

"make" writes test files into DIR (with Python anndata, or with h5py by hand for layouts
anndata no longer writes). "dump" reads each file with Python anndata and writes to `out`:
meta.json (n_rows, n_cols, obs_names, var_names, labels) and the matrix as canonical CSR
float32 in little-endian binaries indptr.bin (u64), indices.bin (u32), data.bin (f32).
"""

import json
import os
import sys
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

warnings.simplefilter("ignore")


def base(rng, n_obs=37, n_var=23):
    """Counts with an empty row and an empty column, unicode and plain names, labels."""
    dense = rng.poisson(0.7, size=(n_obs, n_var)).astype(np.float32)
    dense[5] = 0
    dense[:, 7] = 0
    obs_names = [f"cell_{i}" for i in range(n_obs)]
    obs_names[3] = "zelle_ä_3"
    cell_type = pd.Categorical(rng.choice(["T", "B", "NK"], n_obs))
    cell_type[[1, 4]] = np.nan
    obs = pd.DataFrame(
        {"cell_type": cell_type, "plain": [f"p{i % 4}" for i in range(n_obs)],
         "n": np.arange(n_obs)},
        index=obs_names,
    )
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_var)])
    return dense, obs, var


def make_synthetic(d):
    rng = np.random.default_rng(0)
    dense, obs, var = base(rng)
    n_obs, n_var = dense.shape

    def write(name, X, **kw):
        a = ad.AnnData(X=X, obs=obs.copy(), var=var.copy(), **kw)
        a.write_h5ad(os.path.join(d, name), convert_strings_to_categoricals=False)
        return a

    write("csr_f32.h5ad", sp.csr_matrix(dense), layers={
        "counts": sp.csr_matrix(dense.astype(np.int64)),
        "dense_f64": dense.astype(np.float64) * 0.5,
    })
    write("csc_f64.h5ad", sp.csc_matrix(dense.astype(np.float64) * 0.25))

    a = ad.AnnData(X=dense.astype(np.int32), obs=obs.copy(), var=var.copy())
    big = rng.poisson(0.5, size=(n_obs, 30)).astype(np.float32)
    a.raw = ad.AnnData(X=sp.csr_matrix(big), obs=obs.copy(),
                       var=pd.DataFrame(index=[f"raw_{j}" for j in range(30)]))
    a.write_h5ad(os.path.join(d, "dense_i32.h5ad"), convert_strings_to_categoricals=False)

    # int64 indices/indptr, uint16 values, fixed-length UTF-8 obs names in a column
    # named by `_index` = "barcodes".
    o = obs.copy()
    o.index.name = "barcodes"
    ad.AnnData(X=sp.csr_matrix(dense), obs=o, var=var.copy()).write_h5ad(
        os.path.join(d, "csr_i64.h5ad"), convert_strings_to_categoricals=False)
    with h5py.File(os.path.join(d, "csr_i64.h5ad"), "a") as f:
        for key, dt in [("indices", "i8"), ("indptr", "i8"), ("data", "u2")]:
            v = f[f"X/{key}"][:]
            del f[f"X/{key}"]
            f.create_dataset(f"X/{key}", data=v.astype(dt), chunks=True, compression="gzip")
        assert f["obs"].attrs["_index"] == "barcodes"
        names = [s.encode() for s in o.index]
        attrs = dict(f["obs/barcodes"].attrs)
        del f["obs/barcodes"]
        f.create_dataset("obs/barcodes", data=names,
                         dtype=h5py.string_dtype("utf-8", max(map(len, names))))
        f["obs/barcodes"].attrs.update(attrs)

    # Unsorted column indices and a duplicate entry in CSR rows.
    m = sp.csr_matrix(dense)
    indptr, indices, data = m.indptr.copy(), m.indices.copy(), m.data.copy()
    for r in range(n_obs):
        a_, b_ = indptr[r], indptr[r + 1]
        p = rng.permutation(b_ - a_)
        indices[a_:b_], data[a_:b_] = indices[a_:b_][p], data[a_:b_][p]
    # A second entry for the first column of row 0 (scipy and the reader sum duplicates).
    indices = np.insert(indices, 0, indices[0])
    data = np.insert(data, 0, 10.0)
    indptr[1:] += 1
    u = sp.csr_matrix((data, indices, indptr), shape=dense.shape)
    assert not u.has_canonical_format
    ad.AnnData(X=u, obs=obs.copy(), var=var.copy()).write_h5ad(
        os.path.join(d, "unsorted.h5ad"), convert_strings_to_categoricals=False)

    # anndata 0.7 categorical: int8 codes with a `categories` reference to __categories/<col>.
    p = os.path.join(d, "cat07.h5ad")
    ad.AnnData(X=sp.csr_matrix(dense), obs=obs.copy(), var=var.copy()).write_h5ad(
        p, convert_strings_to_categoricals=False)
    with h5py.File(p, "a") as f:
        g = f["obs"]
        codes = g["cell_type/codes"][:].astype("i1")
        cats = g["cell_type/categories"][:]
        del g["cell_type"]
        g.create_dataset("__categories/cell_type", data=cats, dtype=h5py.string_dtype())
        g["cell_type"] = codes
        g["cell_type"].attrs["categories"] = g["__categories/cell_type"].ref
        g.attrs["encoding-version"] = "0.1.0"

    # Nullable strings (pandas StringDtype) with a missing value.
    ad.settings.allow_write_nullable_strings = True
    o = obs.copy()
    o["nstr"] = pd.array([None if i % 5 == 0 else f"s{i % 3}" for i in range(n_obs)],
                         dtype="string")
    ad.AnnData(X=sp.csr_matrix(dense), obs=o, var=var.copy()).write_h5ad(
        os.path.join(d, "nullable.h5ad"), convert_strings_to_categoricals=False)
    with h5py.File(os.path.join(d, "nullable.h5ad")) as f:
        assert f["obs/nstr"].attrs["encoding-type"] == "nullable-string-array"


def make_legacy(d):
    """The layout of anndata < 0.7, written by hand with h5py."""
    rng = np.random.default_rng(1)
    dense, obs, var = base(rng, n_obs=19, n_var=11)
    with h5py.File(os.path.join(d, "legacy.h5ad"), "w") as f:
        def h5sparse(name, m, fmt):
            g = f.create_group(name)
            g.attrs["h5sparse_format"] = fmt
            g.attrs["h5sparse_shape"] = np.array(m.shape)
            g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr

        h5sparse("X", sp.csc_matrix(dense.astype(np.float64)), "csc")
        rec = np.dtype([("index", h5py.string_dtype()), ("cell_type", "i1"), ("n", "<i8")])
        f["obs"] = np.array(
            list(zip(obs.index, obs["cell_type"].cat.codes, obs["n"])), dtype=rec)
        f["uns/cell_type_categories"] = np.array(
            [c.encode() for c in obs["cell_type"].cat.categories], dtype="S")
        f["var"] = np.array([(v.encode(), 1.5) for v in var.index],
                            dtype=[("index", "S10"), ("mean", "<f4")])
        big = rng.poisson(0.5, size=(dense.shape[0], 14)).astype(np.float32)
        h5sparse("raw.X", sp.csr_matrix(big), "csr")
        f["raw.var"] = np.array([(f"raw_{j}".encode(),) for j in range(14)],
                                dtype=[("index", "S12")])


def make_errors(d):
    rng = np.random.default_rng(2)
    dense, obs, var = base(rng, n_obs=7, n_var=9)
    ad.AnnData(obs=obs, var=var, layers={"counts": sp.csr_matrix(dense)}).write_h5ad(
        os.path.join(d, "no_x.h5ad"), convert_strings_to_categoricals=False)
    for name in ["bad_enc.h5ad", "bad_idx.h5ad"]:
        ad.AnnData(X=sp.csr_matrix(dense), obs=obs, var=var).write_h5ad(
            os.path.join(d, name), convert_strings_to_categoricals=False)
    with h5py.File(os.path.join(d, "bad_enc.h5ad"), "a") as f:
        f["X"].attrs["encoding-type"] = "xyz"
    with h5py.File(os.path.join(d, "bad_idx.h5ad"), "a") as f:
        f["X/indices"][0] = 99


def canonical_csr(m):
    if sp.issparse(m):
        m = sp.csr_matrix(m).astype(np.float32)
        m.sum_duplicates()
        m.sort_indices()
        return m
    return sp.csr_matrix(np.asarray(m).astype(np.float32))


def dump(case):
    a = ad.read_h5ad(case["file"])
    src = case["source"]
    if src == "X":
        m, var_names = a.X, a.var_names
    elif src == "raw":
        m, var_names = a.raw.X, a.raw.var_names
    else:
        m, var_names = a.layers[src.removeprefix("layer:")], a.var_names
    m = canonical_csr(m)
    labels = None
    if case.get("label"):
        labels = ["nan" if pd.isna(v) else str(v) for v in a.obs[case["label"]]]
    out = case["out"]
    os.makedirs(out, exist_ok=True)
    meta = {"n_rows": m.shape[0], "n_cols": m.shape[1], "obs_names": list(map(str, a.obs_names)),
            "var_names": list(map(str, var_names)), "labels": labels}
    with open(os.path.join(out, "meta.json"), "w") as fh:
        json.dump(meta, fh)
    m.indptr.astype("<u8").tofile(os.path.join(out, "indptr.bin"))
    m.indices.astype("<u4").tofile(os.path.join(out, "indices.bin"))
    m.data.astype("<f4").tofile(os.path.join(out, "data.bin"))


def main():
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    makers = {"synthetic": make_synthetic, "legacy": make_legacy, "errors": make_errors}
    for kind in spec.get("make", []):
        makers[kind](spec["dir"])
    for case in spec.get("dump", []):
        dump(case)


if __name__ == "__main__":
    main()
