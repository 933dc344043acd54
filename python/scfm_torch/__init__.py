"""scfm_torch: scfm single-cell foundation models in PyTorch.

Loads a folder written by ``scfm export`` and computes the cell embeddings of
``scfm embed`` exactly (same tokens bit for bit, same network)::

    import anndata, scfm_torch
    model = scfm_torch.load("exported/")             # an nn.Module in eval mode
    adata = anndata.read_h5ad("cells.h5ad")           # raw counts in X
    adata.obsm["X_scfm"] = scfm_torch.embed(model, adata)

Modules: :mod:`scfm_torch.model` (the network, its heads and losses),
:mod:`scfm_torch.tokenizer` (gene alignment, normalisation, bins, inference tokens),
:mod:`scfm_torch.io` (export folders), :mod:`scfm_torch.inference` (embeddings).
"""

from .inference import embed
from .io import ExportConfig, ExportError, load
from .model import CLS, OFFSET, PAD, Outputs, ScfmConfig, ScfmModel, adamw_param_groups, nt_xent
from .tokenizer import (
    CellTokens,
    GeneAlignment,
    VocabEntry,
    align_genes,
    collate,
    model_rows,
    quantile_bins,
    tokenize,
    tokenize_cell,
)

__version__ = "0.1.0"

__all__ = [
    "CLS",
    "OFFSET",
    "PAD",
    "CellTokens",
    "ExportConfig",
    "ExportError",
    "GeneAlignment",
    "Outputs",
    "ScfmConfig",
    "ScfmModel",
    "VocabEntry",
    "adamw_param_groups",
    "align_genes",
    "collate",
    "embed",
    "load",
    "model_rows",
    "nt_xent",
    "quantile_bins",
    "tokenize",
    "tokenize_cell",
]
