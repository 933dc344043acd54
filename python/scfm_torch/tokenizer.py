"""Inference tokenisation of ``scfm embed``, reproduced bit for bit.

The steps and the Rust code each one mirrors:

1. :func:`align_genes` (``worker/src/infer/align.rs``): the input's genes are matched to
   the model's vocabulary by gene id or by symbol, whichever matches more (ids win ties);
   each model gene takes the first input column naming it.
2. :func:`model_rows` (``worker/src/infer/embed.rs::Embedder::model_rows``): per cell the
   matched genes with a positive count, in model-column order, then
   :func:`normalize_log1p` over those genes.
3. :func:`normalize_log1p` (``common/src/data/preprocess/mod.rs::normalize_log1p``), in
   scanpy's float32 arithmetic: the cell total is a float64 sum stored as float32, the
   factor ``total / target_sum`` is float32, each value is divided by it in float32, then
   ``log1p`` in float32 by the C library's ``log1pf`` (the function Rust's ``f32::ln_1p``
   calls; numpy's and torch's float32 ``log1p`` differ from it in the last bit for a few
   percent of values).
4. :func:`quantile_bins` (``common/src/tokenizer/bins.rs``): per-cell quantile bins over all
   the cell's expressed values.
5. :func:`tokenize_cell` (``common/src/tokenizer/mod.rs::Tokenizer::tokenize_inference``):
   ``[CLS]`` then the genes (the ``max_seq_len - 1`` top-expressed when there are more, ties
   to the lower gene index, kept in gene order); :func:`collate` pads a batch with PAD.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import anndata
import numpy as np
import scipy.sparse as sp  # a dependency of anndata
import torch
from torch import Tensor

from .model import CLS, OFFSET, PAD, ScfmModel


@dataclass(frozen=True)
class VocabEntry:
    """One gene of a model's vocabulary (a row of ``vocab.tsv``; token id = row + 2)."""

    gene_id: str
    symbol: str


@dataclass
class GeneAlignment:
    """How an input's columns map onto a model's genes."""

    #: Model gene (vocabulary column) of each input column, or -1.
    map: np.ndarray
    #: Model genes found in the input.
    matched: int
    #: Genes of the model.
    n_model: int
    #: What matched: ``"gene_id"`` or ``"gene_symbol"``.
    by: str

    @property
    def fraction(self) -> float:
        """The fraction of the model's genes the input has."""
        return self.matched / max(self.n_model, 1)


@dataclass
class CellTokens:
    """The inference tokens of one cell: ``[CLS]`` then its kept genes."""

    #: Token ids (``[CLS]`` = 1, gene ``g`` = ``g + 2``), int64.
    genes: np.ndarray
    #: Expression bins (0 for ``[CLS]``), int64.
    bins: np.ndarray
    #: log1p-normalised values (0 for ``[CLS]``), float32.
    values: np.ndarray


# --------------------------------------------------------------------------------------
# Gene alignment
# --------------------------------------------------------------------------------------


def _map_by(names: Sequence[str], keys: Sequence[str]) -> np.ndarray:
    """Vocabulary column of each input name by ``keys`` (first column of a repeated key);
    a column is taken by the first input name only."""
    index: dict[str, int] = {}
    for c, k in enumerate(keys):
        index.setdefault(k, c)
    taken: set[int] = set()
    out = np.full(len(names), -1, dtype=np.int64)
    for i, name in enumerate(names):
        c = index.get(name)
        if c is not None and c not in taken:
            taken.add(c)
            out[i] = c
    return out


def align_genes(names: Sequence[str], vocab: Sequence[VocabEntry]) -> GeneAlignment:
    """Maps input gene ``names`` onto ``vocab`` by gene id or by symbol, whichever matches
    more genes (ids win ties)."""
    names = [str(n) for n in names]
    by_id = _map_by(names, [e.gene_id for e in vocab])
    by_symbol = _map_by(names, [e.symbol for e in vocab])
    n_id, n_symbol = int((by_id >= 0).sum()), int((by_symbol >= 0).sum())
    if n_symbol > n_id:
        return GeneAlignment(map=by_symbol, matched=n_symbol, n_model=len(vocab), by="gene_symbol")
    return GeneAlignment(map=by_id, matched=n_id, n_model=len(vocab), by="gene_id")


# --------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------


def _c_log1pf() -> Optional[Callable[[float], float]]:
    """The C library's ``log1pf``, if it can be loaded."""
    name = ctypes.util.find_library("m") or ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        f = ctypes.CDLL(name).log1pf
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_float
    f.argtypes = [ctypes.c_float]
    return f


_LOG1PF = _c_log1pf()


def log1pf(x: np.ndarray) -> np.ndarray:
    """``log1p`` of float32 values as the C library's ``log1pf`` computes it (called once per
    distinct value). Without a loadable C math library this falls back to the float64
    ``log1p`` rounded to float32, which may differ from ``log1pf`` in the last bit."""
    x = np.asarray(x, dtype=np.float32)
    if _LOG1PF is None:
        return np.log1p(x.astype(np.float64)).astype(np.float32)
    uniq, inverse = np.unique(x, return_inverse=True)
    f = _LOG1PF
    logs = np.fromiter((f(v) for v in uniq.tolist()), dtype=np.float32, count=len(uniq))
    return logs[inverse.reshape(x.shape)]


def _row_totals(indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Each row's sum accumulated in float64 in storage order (Rust's ``fold``), stored as
    float32."""
    totals = np.zeros(len(indptr) - 1, dtype=np.float64)
    for r, (a, b) in enumerate(zip(indptr[:-1].tolist(), indptr[1:].tolist())):
        if b > a:
            totals[r] = np.cumsum(data[a:b], dtype=np.float64)[-1]
    return totals.astype(np.float32)


def normalize_log1p(indptr: np.ndarray, data: np.ndarray, target_sum: float) -> np.ndarray:
    """``log1p(v / (total / target_sum))`` of each CSR row's stored values (float32, the
    arithmetic of ``normalize_log1p``); rows whose total is not positive stay as they are.
    Returns the new ``data``."""
    data = np.asarray(data, dtype=np.float32)
    indptr = np.asarray(indptr, dtype=np.int64)
    totals = _row_totals(indptr, data)
    factors = totals / np.float32(target_sum)  # float32 division
    per_value = np.repeat(factors, np.diff(indptr))
    scale = np.repeat(totals > 0, np.diff(indptr))
    out = data.copy()
    out[scale] = log1pf(data[scale] / per_value[scale])
    return out


def input_counts(adata: anndata.AnnData, layer: Optional[str] = None, use_raw: bool = False) -> tuple[sp.csr_matrix, list[str]]:
    """The raw counts of ``adata`` as float32 CSR (``X``, ``layers[layer]`` or ``raw.X``) and
    the names of their columns (``var_names``, or ``raw.var_names``)."""
    if layer is not None and use_raw:
        raise ValueError("choose either layer or use_raw, not both")
    if use_raw:
        if adata.raw is None:
            raise ValueError("use_raw=True but the AnnData has no .raw")
        x, names = adata.raw.X, list(adata.raw.var_names)
    elif layer is not None:
        if layer not in adata.layers:
            raise ValueError(f"no layer {layer!r} (layers: {list(adata.layers.keys())})")
        x, names = adata.layers[layer], list(adata.var_names)
    else:
        x, names = adata.X, list(adata.var_names)
    if x is None:
        raise ValueError("the AnnData has no count matrix")
    counts = sp.csr_matrix(x, dtype=np.float32)
    data = counts.data
    bad = ~np.isfinite(data) | (data < 0)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(counts.indptr, k, side="right") - 1)
        gene = names[counts.indices[k]]
        raise ValueError(f"bad count {data[k]} at cell {row}, gene `{gene}`; expected raw counts (finite, >= 0)")
    return counts, names


def model_rows(counts: sp.csr_matrix, alignment: GeneAlignment, target_sum: float) -> sp.csr_matrix:
    """The model's rows of ``counts`` (raw counts over the input's columns): each cell's
    matched genes with a positive count, in model-column order, normalised over those genes
    and log1p-transformed (float32 CSR ``[n_cells, n_model]``)."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    cols = alignment.map[counts.indices]
    keep = (counts.data > 0) & (cols >= 0)
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))[keep]
    cols, vals = cols[keep], counts.data[keep]
    order = np.lexsort((cols, rows))  # by row, then model column
    rows, cols, vals = rows[order], cols[order], vals[order]
    indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=counts.shape[0]), out=indptr[1:])
    data = normalize_log1p(indptr, vals, target_sum)
    return sp.csr_matrix((data, cols.astype(np.int64), indptr), shape=(counts.shape[0], alignment.n_model))


# --------------------------------------------------------------------------------------
# Bins and tokens
# --------------------------------------------------------------------------------------


def partition_point(edges: np.ndarray, v: np.float32) -> int:
    """Rust's ``edges.partition_point(|&e| e < v)`` (its binary search, step by step), for
    edges that are not sorted (float corner cases only)."""
    size = len(edges)
    if size == 0:
        return 0
    base = 0
    while size > 1:
        half = size // 2
        mid = base + half
        if edges[mid] < v:
            base = mid
        size -= half
    return base + int(edges[base] < v)


def quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-cell quantile bins (``bins.rs::quantile_bins``): the edges are the quantiles of
    the values at ``n_bins - 1`` evenly spaced probabilities (linear interpolation in
    float32 between the order statistics); a value's bin is ``1 +`` the number of edges
    strictly below it. No edges (every value in bin 1) for ``n_bins <= 2``."""
    values = np.asarray(values, dtype=np.float32)
    if values.size == 0 or n_bins <= 2:
        return np.ones(values.size, dtype=np.int64)
    ordered = np.sort(values)
    n_edges = n_bins - 1
    pos = (float(values.size - 1) * np.arange(n_edges, dtype=np.float64)) / float(n_edges - 1)
    lo = pos.astype(np.int64)
    hi = lo + (lo.astype(np.float64) < pos)
    frac = (pos - lo.astype(np.float64)).astype(np.float32)
    a, b = ordered[lo], ordered[hi]
    edges = a + (b - a) * frac  # float32 throughout
    if np.all(edges[:-1] <= edges[1:]):
        below = np.searchsorted(edges, values, side="left")
    else:
        below = np.array([partition_point(edges, v) for v in values], dtype=np.int64)
    return 1 + below.astype(np.int64)


def tokenize_cell(genes: np.ndarray, values: np.ndarray, max_seq_len: int, n_bins: int) -> CellTokens:
    """The inference tokens of one cell from its expressed model genes (increasing column
    indices) and log1p-normalised values (``Tokenizer::tokenize_inference``)."""
    genes = np.asarray(genes, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    bins = quantile_bins(values, n_bins)
    n = min(genes.size, max_seq_len - 1)
    if genes.size > n:
        # Highest value first; equal values by the lower gene index (the stable order).
        top = np.argsort(-values, kind="stable")[:n]
        keep = top[np.argsort(genes[top], kind="stable")]
    else:
        keep = np.arange(genes.size)
    return CellTokens(
        genes=np.concatenate([[CLS], genes[keep] + OFFSET]).astype(np.int64),
        bins=np.concatenate([[0], bins[keep]]).astype(np.int64),
        values=np.concatenate([[0.0], values[keep]]).astype(np.float32),
    )


def tokenize_rows(x: sp.csr_matrix, max_seq_len: int, n_bins: int) -> list[CellTokens]:
    """The inference tokens of every row of normalised model rows ``x``."""
    return [
        tokenize_cell(x.indices[a:b], x.data[a:b], max_seq_len, n_bins)
        for a, b in zip(x.indptr[:-1], x.indptr[1:])
    ]


def tokenize(
    model: ScfmModel,
    adata: anndata.AnnData,
    layer: Optional[str] = None,
    use_raw: bool = False,
) -> tuple[list[CellTokens], GeneAlignment]:
    """The inference tokens ``scfm embed`` feeds ``model`` (loaded by :func:`scfm_torch.load`,
    so that it carries its vocabulary and ``target_sum``) for the raw counts of ``adata``
    (``X``, ``layers[layer]`` or ``raw.X``), and the gene alignment. Errors when none of the
    model's genes is in the input."""
    if model.vocab is None or model.target_sum is None:
        raise ValueError("the model carries no vocabulary: load it from an export folder with scfm_torch.load")
    counts, names = input_counts(adata, layer=layer, use_raw=use_raw)
    alignment = align_genes(names, model.vocab)
    if alignment.matched == 0:
        raise ValueError(
            f"none of the input's {len(names)} genes (e.g. {names[:3]}) is in the model's vocabulary of "
            f"{len(model.vocab)} genes (e.g. {[e.gene_id for e in model.vocab[:3]]})"
        )
    x = model_rows(counts, alignment, model.target_sum)
    return tokenize_rows(x, model.cfg.max_seq_len, model.cfg.n_bins), alignment


def collate(tokens: Sequence[CellTokens], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Pads ``tokens`` to the longest with PAD (bin 0, value 0): ``genes``, ``bins`` (int64),
    ``values`` (float32) and ``masked`` (bool, all false), each ``[N, L]``."""
    n = len(tokens)
    length = max((t.genes.size for t in tokens), default=0)
    genes = np.full((n, length), PAD, dtype=np.int64)
    bins = np.zeros((n, length), dtype=np.int64)
    values = np.zeros((n, length), dtype=np.float32)
    for i, t in enumerate(tokens):
        k = t.genes.size
        genes[i, :k], bins[i, :k], values[i, :k] = t.genes, t.bins, t.values
    batch = {
        "genes": torch.from_numpy(genes),
        "bins": torch.from_numpy(bins),
        "values": torch.from_numpy(values),
        "masked": torch.zeros((n, length), dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}
