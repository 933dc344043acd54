"""Cell embeddings as ``scfm embed`` computes them (``worker/src/infer/embed.rs``, ``run.rs``)."""

from __future__ import annotations

from typing import Optional

import anndata
import numpy as np
import torch

from .groups import length_groups as group_rows
from .model import PAD, ScfmModel
from .tokenizer import collate, tokenize

#: Cells ``scfm embed`` reads at a time; batches never straddle two such blocks.
BLOCK_ROWS = 4096


def embed(
    model: ScfmModel,
    adata: anndata.AnnData,
    batch_size: int = 64,
    layer: Optional[str] = None,
    use_raw: bool = False,
    embedding: Optional[str] = None,
    metric_weight: Optional[float] = None,
    length_groups: int = 4,
) -> np.ndarray:
    """Cell embeddings ``[n_cells, cell_dim]`` (float32: the pooled vectors, through the
    ``latent`` map when the model has one, and times ``model.decoder_metric()`` with
    ``embedding: decoder_metric``; not normalised) of
    the raw counts of ``adata`` (``X``, ``layers[layer]`` or ``raw.X``) under ``model`` (from
    :func:`scfm_torch.load`), equal to ``obsm['X_scfm']`` of ``scfm embed``.

    The cells are tokenised as for inference (:func:`scfm_torch.tokenize`), encoded in
    batches of ``batch_size`` without gradients or dropout on the model's device, pooled
    (``cls`` or ``mean``, as configured) and read out as ``embedding`` (``pooled`` or
    ``decoder_metric``; ``None``: the model's setting, as ``scfm embed --embedding``), the
    metric at ``metric_weight`` (``None``: the model's, as ``--metric-weight``); their length carries information, so they are
    not L2-normalised (``l2_normalize`` them for unit rows). The batches
    are those of ``scfm embed``, and so are their groups of similar length (up to
    ``length_groups``, each padded to its own longest row: :mod:`scfm_torch.groups`; 1 pads
    every row to the batch's longest), so the padding is the same too. The model's
    training/evaluation mode is left as it was.
    """
    if length_groups < 1:
        raise ValueError(f"length_groups must be >= 1, not {length_groups}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    kind = model.cfg.read_out if embedding is None else embedding
    if kind not in ("pooled", "decoder_metric"):
        raise ValueError(f"unknown embedding {kind!r}: pooled or decoder_metric")
    if kind == "decoder_metric" and model.gepc is None:
        raise ValueError("embedding decoder_metric reads the GEPC decoder, which this model (w_gepc: 0) lacks")
    if metric_weight is not None and kind != "decoder_metric":
        raise ValueError("metric_weight applies to embedding decoder_metric")
    # Before tokenising and before the mode switch: a bad weight fails fast and leaves the
    # model as it was.
    readout = model.decoder_metric(metric_weight) if kind == "decoder_metric" else None
    tokens, _ = tokenize(model, adata, layer=layer, use_raw=use_raw)
    device = next(model.parameters()).device
    out = np.empty((len(tokens), model.cfg.cell_dim), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for block in range(0, len(tokens), BLOCK_ROWS):
                end = min(block + BLOCK_ROWS, len(tokens))
                for a in range(block, end, batch_size):
                    b = min(a + batch_size, end)
                    batch = collate(tokens[a:b], device)
                    cell = _encode_grouped(model, batch, length_groups).float()
                    if readout is not None:
                        cell = cell @ readout
                    out[a:b] = cell.cpu().numpy()
    finally:
        model.train(was_training)
    return out


def _encode_grouped(model: ScfmModel, batch: dict, max_groups: int) -> torch.Tensor:
    """The batch's cell embeddings, its rows encoded in groups of similar length when that
    saves padding (``scfm embed``'s ``encode_cells``)."""
    keys = ("genes", "bins", "values", "masked")
    lengths = (batch["genes"] != PAD).sum(1).tolist()
    groups = group_rows(lengths, max_groups) if max_groups > 1 else None
    if groups is None:
        return model.encode(*(batch[k] for k in keys))[1]
    cell = None
    for rows, length in groups:
        idx = torch.tensor(rows, device=batch["genes"].device)
        _, part = model.encode(*(batch[k][idx, :length] for k in keys))
        if cell is None:
            cell = part.new_empty((len(lengths), part.shape[1]))
        cell[idx] = part
    return cell
