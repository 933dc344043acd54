"""The scfm transformer in PyTorch, with the semantics of the Rust model in ``worker/src/model/``.

* ``embed``       gene-token embedding + expression embedding (+ optional positional
                  encoding), LayerNorm, dropout (``embedding.rs``);
* ``encoder``     pre-LayerNorm transformer blocks with fused scaled-dot-product
                  attention and a key-padding mask, then a final LayerNorm (``encoder.rs``);
* ``mgem``        masked gene-expression head ``out(LN(gelu(dense(h))))`` (``heads.rs``);
* ``latent``      (only with ``latent_dim``) a linear map of the pooled output: the cell
                  embedding then has ``latent_dim`` entries (``mod.rs``);
* ``contrastive`` projection head ``normalize(fc2(relu(fc1(cell))))`` (``heads.rs``);
* ``gepc``        (only when ``w_gepc > 0``) the expression decoder
                  ``cell(c) @ sigmoid(gene(E[2:]))ᵀ + bias`` predicting every vocabulary
                  gene's log1p-normalised expression from the cell embedding (``heads.rs``);
* losses          masked cross-entropy with label smoothing (binned) or masked MSE
                  (continuous), NT-Xent over two views per cell, and the GEPC mean
                  squared error against the dense cell profiles (``loss.rs``, ``mod.rs``).

Module and parameter names equal the Rust ``VarStore`` names (``encoder.layers.0.attn.qkv.weight``,
``[out, in]`` linear weights), so a ``model.safetensors`` written by the worker loads with
``model.load_state_dict(safetensors.torch.load_file(path), strict=True)``. The fixed
sinusoidal table is a non-persistent buffer, as it is not a Rust variable either.

``forward`` accepts any ``[N, L]`` batch with ``L <= max_seq_len`` (for the positional
variants), and ``model.train()`` enables dropout at the same three places as the Rust model
(after the embedding LayerNorm, after the attention output projection, after the
feed-forward output). Attention probabilities are not dropped.

Conventions shared with the Rust side (``common/src/config/model.rs``):

* token id 0 is PAD (never attended to as a key), 1 is ``[CLS]`` (always at position 0),
  gene ``g`` has id ``g + 2``; the gene table has ``n_genes + 2`` rows;
* the binned expression table has ``n_bins + 1`` rows, the last being the MASK bin;
* training batches hold two views per cell: rows ``i`` and ``i + B`` form a positive pair.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # only for annotations: the network needs neither
    from .io import ExportConfig
    from .tokenizer import VocabEntry

#: Padding token id.
PAD = 0
#: ``[CLS]`` token id.
CLS = 1
#: Number of reserved token ids before the genes.
OFFSET = 2
#: LayerNorm epsilon (tch / PyTorch default).
LN_EPS = 1e-5
#: Standard deviation of the BERT-style normal initialisation (``init.rs``).
INIT_STD = 0.02
#: Lower bound of the norm in L2 normalisation (``heads.rs::l2_normalize``).
NORM_EPS = 1e-12


@dataclass
class ScfmConfig:
    """``ModelConfig`` (``common/src/config/model.rs``), field names as in the Rust struct."""

    hidden: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_seq_len: int
    dropout: float
    expression: str  # "binned" | "continuous"
    n_bins: int
    positional: str  # "none" | "sinusoidal" | "learned"
    label_smoothing: float
    projection_dim: int
    temperature: float
    w_mgem: float
    w_contrastive: float
    pooling: str  # "cls" | "mean"
    mask_ratio: float = 0.15  # used by the training tokenizer only
    w_gepc: float = 0.0  # serde default: 0 leaves the GEPC decoder out
    subsample: str = "random"  # "random" | "top": the training tokenizer's choice in deep cells
    # "log1p" | "scaled": the GEPC decoder predicts each gene's log1p value, or that value
    # standardised by the gene's mean and std over the training data (clipped to ±gepc_clip)
    gepc_target: str = "log1p"
    # the clip of the standardised targets (``gepc_target: scaled``; training only)
    gepc_clip: float = 10.0
    # the GEPC decoder also sees each cell's genes-detected covariate (``detected_covariate``)
    # through one learned slope per gene (``gepc.detected``)
    gepc_detected: bool = False
    # "all" | "unseen": the GEPC loss over every gene, or only over the genes a view does
    # not show unmasked (``unseen_genes``)
    gepc_genes: str = "all"
    # "gene_query" | "per_gene": the GEPC decoder's form (``GepcHead``)
    gepc_decoder: str = "gene_query"
    # the cell embedding's size when it is a linear map (``latent``) of the pooled encoder
    # output, which the contrastive head and the GEPC decoder read; None: the pooled output
    latent_dim: Optional[int] = None
    # "pooled" | "decoder_metric": what ``embed`` gives, the pooled vector ``c`` or ``c S``
    # with ``S`` the GEPC decoder's metric (``ScfmModel.decoder_metric``)
    embedding: str = "pooled"
    # with ``embedding: decoder_metric``, how far the read-out's metric goes from the pooled
    # vector's (0) to the decoder's (1): ``S = (MᵀM / G)^(w/2)``
    metric_weight: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScfmConfig":
        """The config of a ``ModelConfig`` dict; unknown or missing keys are errors."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        missing = [
            n
            for n, f in fields.items()
            if n not in d and f.default is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"model config lacks keys: {missing}")
        return cls(**{k: d[k] for k in fields if k in d})

    def validate(self) -> None:
        """Raises ``ValueError`` for settings the model cannot be built with."""
        if self.hidden <= 0 or self.n_layers <= 0 or self.ffn_dim <= 0:
            raise ValueError("hidden, n_layers and ffn_dim must be > 0")
        if self.n_heads <= 0 or self.hidden % self.n_heads:
            raise ValueError(f"{self.n_heads} heads do not divide hidden size {self.hidden}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len {self.max_seq_len} leaves no room for a gene after [CLS]")
        if self.expression not in ("binned", "continuous"):
            raise ValueError(f"unknown expression encoding {self.expression!r}")
        if self.positional not in ("none", "sinusoidal", "learned"):
            raise ValueError(f"unknown positional encoding {self.positional!r}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {self.pooling!r}")
        if self.latent_dim is not None and self.latent_dim <= 0:
            raise ValueError(f"latent_dim {self.latent_dim} must be > 0 (or absent)")
        if self.subsample not in ("random", "top"):
            raise ValueError(f"unknown subsample {self.subsample!r}")
        if self.gepc_target not in ("log1p", "scaled"):
            raise ValueError(f"unknown gepc_target {self.gepc_target!r}")
        if self.gepc_genes not in ("all", "unseen"):
            raise ValueError(f"unknown gepc_genes {self.gepc_genes!r}")
        if self.gepc_decoder not in ("gene_query", "per_gene"):
            raise ValueError(f"unknown gepc_decoder {self.gepc_decoder!r}")
        if self.embedding not in ("pooled", "decoder_metric"):
            raise ValueError(f"unknown embedding {self.embedding!r}")
        if not 0.0 <= self.metric_weight <= 1.0:
            raise ValueError(f"metric_weight {self.metric_weight} is outside [0, 1]")
        if self.expression == "binned" and self.n_bins < 2:
            raise ValueError("binned expression needs n_bins >= 2")
        for name in ("w_mgem", "w_contrastive", "w_gepc"):
            w = getattr(self, name)
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} = {w} must be a finite number >= 0")

    @property
    def n_out(self) -> int:
        """Size of the MGEM head output: ``n_bins`` logits or one value."""
        return self.n_bins if self.expression == "binned" else 1

    @property
    def has_gepc(self) -> bool:
        """Whether the model has the GEPC expression decoder (``w_gepc > 0``)."""
        return self.w_gepc > 0

    @property
    def read_out(self) -> str:
        """The embedding the model gives: ``embedding``, but ``"pooled"`` without the GEPC
        decoder (``ModelConfig::read_out``)."""
        return self.embedding if self.has_gepc else "pooled"

    @property
    def cell_dim(self) -> int:
        """The cell embedding's size: ``latent_dim`` when set, else ``hidden``."""
        return self.latent_dim if self.latent_dim is not None else self.hidden


def sinusoidal_table(length: int, hidden: int) -> Tensor:
    """Fixed sinusoidal table ``[length, hidden]``: sin on even, cos on odd features.

    Computed in float32 step by step exactly as ``embedding.rs::sinusoidal_table``:
    ``div = exp(i * (-ln(10000) / hidden))`` for ``i = 0, 2, 4, ...``; ``angles = pos * div``;
    ``table[:, 0::2] = sin(angles)``; ``table[:, 1::2] = cos(angles)[:, :hidden // 2]``.
    """
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    i = torch.arange(0, hidden, 2, dtype=torch.float32)
    div = (i * (-math.log(10000.0) / hidden)).exp()
    angles = pos * div.unsqueeze(0)  # [length, ceil(hidden / 2)]
    table = torch.zeros(length, hidden, dtype=torch.float32)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()[:, : hidden // 2]
    return table


# --------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------


class ContinuousExpr(nn.Module):
    """``fc2(gelu(fc1(value)))``; masked positions take the learned ``mask`` vector."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(1, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.mask = nn.Parameter(torch.zeros(hidden))

    def forward(self, values: Tensor, masked: Tensor) -> Tensor:
        e = self.fc2(F.gelu(self.fc1(values.unsqueeze(-1))))
        return torch.where(masked.unsqueeze(-1), self.mask, e)


class TokenEmbedding(nn.Module):
    """Gene + expression (+ position) embedding, LayerNorm, dropout.

    Parameters: ``gene.weight``, ``expr.weight`` (binned) or ``expr.{fc1,fc2}.*`` and
    ``expr.mask`` (continuous), ``pos.weight`` (learned positions), ``norm.*``.
    """

    def __init__(self, cfg: ScfmConfig, n_tokens: int):
        super().__init__()
        h = cfg.hidden
        self.expression = cfg.expression
        self.positional = cfg.positional
        self.dropout = cfg.dropout
        # No padding_idx: the PAD row is an ordinary trainable row, as in the Rust model.
        self.gene = nn.Embedding(n_tokens, h)
        if cfg.expression == "binned":
            self.expr: nn.Module = nn.Embedding(cfg.n_bins + 1, h)  # last row = MASK bin
        else:
            self.expr = ContinuousExpr(h)
        if cfg.positional == "learned":
            self.pos = nn.Embedding(cfg.max_seq_len, h)
        elif cfg.positional == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, h), persistent=False)
        self.norm = nn.LayerNorm(h, eps=LN_EPS)

    def forward(self, genes: Tensor, bins: Tensor, values: Tensor, masked: Tensor) -> Tensor:
        x = self.gene(genes)
        if self.expression == "binned":
            x = x + self.expr(bins)
        else:
            x = x + self.expr(values, masked)
        length = genes.shape[1]
        if self.positional == "learned":
            x = x + self.pos.weight[:length].unsqueeze(0)
        elif self.positional == "sinusoidal":
            x = x + self.pos_table[:length].unsqueeze(0)
        return F.dropout(self.norm(x), self.dropout, self.training)


# --------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention: fused ``qkv`` projection, SDPA, ``out`` projection."""

    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        """``x`` ``[N, L, H]``; ``attend`` ``[N, 1, 1, L]`` bool, true where a key is valid."""
        n, length, h = x.shape
        hd = h // self.n_heads
        # [N, L, 3H] -> [N, L, 3, heads, hd] -> [3, N, heads, L, hd]
        qkv = self.qkv(x).view(n, length, 3, self.n_heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=0.0, is_causal=False)
        return self.out(a.transpose(1, 2).reshape(n, length, h))


class FeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))`` with exact (erf) GELU."""

    def __init__(self, hidden: int, ffn_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN block: ``x + drop(attn(norm1(x)))``, then ``x + drop(ffn(norm2(x)))``."""

    def __init__(self, hidden: int, n_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.attn = Attention(hidden, n_heads)
        self.norm2 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.ffn = FeedForward(hidden, ffn_dim)
        self.dropout = dropout

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        x = x + F.dropout(self.attn(self.norm1(x), attend), self.dropout, self.training)
        return x + F.dropout(self.ffn(self.norm2(x)), self.dropout, self.training)


class Encoder(nn.Module):
    """``layers`` followed by the final LayerNorm ``norm``."""

    def __init__(self, cfg: ScfmConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            Block(cfg.hidden, cfg.n_heads, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.hidden, eps=LN_EPS)

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, attend)
        return self.norm(x)


# --------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------


class MgemHead(nn.Module):
    """``out(norm(gelu(dense(h))))``: ``n_bins`` logits (binned) or one value (continuous)."""

    def __init__(self, hidden: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(self.norm(F.gelu(self.dense(h))))


class ProjectionHead(nn.Module):
    """``normalize(fc2(relu(fc1(cell))))`` with unit L2 rows (eps 1e-12); ``fc1`` maps the
    cell embedding (``cell`` wide) to ``hidden``."""

    def __init__(self, cell: int, hidden: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(cell, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, cell: Tensor) -> Tensor:
        return l2_normalize(self.fc2(F.relu(self.fc1(cell))))


class GepcHead(nn.Module):
    """GEPC expression decoder: gene ``g``'s log1p-normalised expression in a cell (or, with
    ``gepc_target: scaled``, that value standardised) is predicted from the cell embedding ``c``; with ``gepc_detected``, plus ``detected_g * d``
    for the cell's genes-detected covariate ``d``. Two forms (``heads.rs``):

    * ``gene_query`` (scGPT's MVC): ``⟨cell(c), sigmoid(gene(e_g))⟩ + bias_g`` with ``e_g``
      the gene's token embedding (shared with the input); parameters ``cell.*`` (``[C, H]``
      with ``C`` the cell embedding's size), ``gene.*`` (``[H, H]``) linear maps;
    * ``per_gene``: ``weight[g] · c + bias_g``; parameter ``weight`` ``[G, C]``.

    Both have ``bias`` (one per gene) and, with ``detected``, ``detected`` (one slope per gene).
    """

    def __init__(self, cell: int, hidden: int, n_genes: int, detected: bool = False, form: str = "gene_query"):
        super().__init__()
        self.form = form
        if form == "per_gene":
            self.weight = nn.Parameter(torch.zeros(n_genes, cell))
        else:
            self.cell = nn.Linear(cell, hidden)
            self.gene = nn.Linear(hidden, hidden)
        self.bias = nn.Parameter(torch.zeros(n_genes))
        self.detected = nn.Parameter(torch.zeros(n_genes)) if detected else None

    def linear_map(self, genes: Tensor) -> Tensor:
        """The decoder's linear map of the cell embedding ``[C, G]`` (``heads.rs::linear_map``):
        the prediction is ``cell @ map + bias`` (plus the genes-detected term)."""
        if self.form == "per_gene":
            return self.weight.T
        query = torch.sigmoid(self.gene(genes))
        return self.cell.weight.T @ query.T

    def forward(self, cell: Tensor, genes: Tensor, detected: Optional[Tensor] = None) -> Tensor:
        """``cell`` ``[N, C]``; ``genes`` the gene rows of the token table ``[G, H]`` (used
        by ``gene_query``); ``detected`` the cells' covariates ``[N]`` (left out when
        ``None``) → ``[N, G]``."""
        if self.form == "per_gene":
            pred = cell @ self.weight.T + self.bias
        else:
            query = torch.sigmoid(self.gene(genes))
            pred = self.cell(cell) @ query.T + self.bias
        if self.detected is not None and detected is not None:
            pred = pred + detected[:, None] * self.detected[None, :]
        return pred


DETECTED_CENTRE = 5.0  # ln(1 + 147): a typical cell (heads.rs::DETECTED_CENTRE)


def detected_covariate(profile: Tensor) -> Tensor:
    """The GEPC decoder's genes-detected covariate of log1p-normalised profiles ``[N, G]``:
    ``ln(1 + n) - 5`` with ``n`` the genes above 0 per row (``heads.rs::detected_covariate``)."""
    n = (profile > 0).sum(-1).double()
    return (torch.log1p(n) - DETECTED_CENTRE).float()


def l2_normalize(x: Tensor) -> Tensor:
    """Rows divided by ``max(‖row‖₂, 1e-12)`` (``heads.rs::l2_normalize``)."""
    return F.normalize(x, p=2.0, dim=-1, eps=NORM_EPS)


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def mgem_cross_entropy(logits: Tensor, targets: Tensor, masked: Tensor, label_smoothing: float) -> Tensor:
    """Cross-entropy of ``logits`` ``[N, L, C]`` vs ``targets`` ``[N, L]``, mean over ``masked``."""
    return F.cross_entropy(logits[masked], targets[masked], label_smoothing=label_smoothing)


def mgem_mse(pred: Tensor, targets: Tensor, masked: Tensor) -> Tensor:
    """Mean squared error of ``pred`` ``[N, L, 1]`` vs ``targets`` ``[N, L]`` over ``masked``."""
    return F.mse_loss(pred.squeeze(-1)[masked], targets[masked])


def nt_xent(z: Tensor, temperature: float) -> Tensor:
    """NT-Xent (SimCLR) over ``z`` ``[2B, D]`` (unit rows; rows ``i`` and ``i + B`` are a pair).

    Mean over all ``2B`` anchors of ``-log softmax(z zᵀ / τ)[i, (i + B) mod 2B]`` with the
    self-similarity on the diagonal excluded (set to ``-inf``).
    """
    n2 = z.shape[0]
    if n2 < 2 or n2 % 2:
        raise ValueError("nt_xent needs an even number of rows")
    b = n2 // 2
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    targets = (torch.arange(n2, device=z.device) + b) % n2
    return F.cross_entropy(sim, targets)


def gepc_mse(pred: Tensor, profile: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean squared error of the GEPC predictions ``[N, G]`` vs the dense profiles ``[N, G]``;
    with ``weight`` (0/1, ``[N, G]``) averaged over the entries it selects."""
    if weight is None:
        return F.mse_loss(pred, profile)
    return ((pred - profile).square() * weight).sum() / weight.sum().clamp_min(1.0)


def unseen_genes(genes: Tensor, masked: Tensor, n_genes: int) -> Tensor:
    """``[N, n_genes]``: 1 where a vocabulary gene is not among the row's unmasked gene
    tokens (masked, left out of the view, or not expressed), else 0 (``gepc_genes: unseen``)."""
    visible = (genes >= OFFSET) & ~masked
    idx = torch.where(visible, genes - OFFSET, torch.full_like(genes, n_genes))
    w = torch.ones(genes.shape[0], n_genes + 1, device=genes.device)
    return w.scatter(1, idx, 0.0)[:, :n_genes]


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """What a forward pass produces (same meaning as the Rust ``Outputs``)."""

    hidden: Tensor  # [N, L, H] after the final LayerNorm
    mgem: Tensor  # [N, L, n_bins] logits or [N, L, 1] predictions
    cell: Tensor  # [N, H] pooled cell embedding (not normalised)
    proj: Tensor  # [N, projection_dim] unit rows
    gepc: Optional[Tensor] = None  # [N, n_genes] GEPC predictions (models with the decoder)


class ScfmModel(nn.Module):
    """The scfm transformer (see the module docstring).

    A model loaded from an export folder (:func:`scfm_torch.load`) also carries its gene
    vocabulary (``vocab``, in column order) and normalisation target (``target_sum``),
    which :func:`scfm_torch.embed` uses, and the folder's ``config.json``
    (``export_config``); all are ``None`` for a model built directly.
    """

    def __init__(self, cfg: ScfmConfig, n_genes: int):
        super().__init__()
        cfg.validate()
        if n_genes <= 0:
            raise ValueError("the gene vocabulary is empty")
        self.cfg = cfg
        self.n_genes = n_genes
        self.vocab: Optional[list[VocabEntry]] = None
        self.target_sum: Optional[float] = None
        self.export_config: Optional[ExportConfig] = None
        self.embed = TokenEmbedding(cfg, n_genes + OFFSET)
        self.encoder = Encoder(cfg)
        self.mgem = MgemHead(cfg.hidden, cfg.n_out)
        c = cfg.cell_dim
        self.latent = nn.Linear(cfg.hidden, cfg.latent_dim) if cfg.latent_dim is not None else None
        self.contrastive = ProjectionHead(c, cfg.hidden, cfg.projection_dim)
        self.gepc = (
            GepcHead(c, cfg.hidden, n_genes, cfg.gepc_detected, cfg.gepc_decoder) if cfg.has_gepc else None
        )
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], n_genes: int) -> "ScfmModel":
        """Builds the model from a ``ModelConfig`` dict (the ``model`` entry of ``config.json``)."""
        return cls(ScfmConfig.from_dict(cfg), n_genes)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation of ``init.rs``: weights and embeddings N(0, 0.02) (the ``latent``
        map N(0, 1 / hidden)), biases 0
        (the GEPC gene biases and genes-detected slopes too), LayerNorm weight 1 / bias 0, continuous ``mask``
        vector N(0, 0.02)."""
        for name, p in self.named_parameters():
            if "norm" in name:  # every LayerNorm (embed.norm, norm1/norm2, encoder.norm, mgem.norm)
                p.fill_(1.0 if name.endswith(".weight") else 0.0)
            elif name.endswith(".bias") or name == "gepc.detected":
                p.zero_()
            elif name == "latent.weight":  # init::linear_unit: keeps the pooled output's scale
                p.normal_(0.0, 1.0 / math.sqrt(self.cfg.hidden))
            else:
                p.normal_(0.0, INIT_STD)

    def encode(self, genes: Tensor, bins: Tensor, values: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder output ``[N, L, H]`` after the final LayerNorm and the cell embeddings
        ``[N, C]`` (not normalised): ``cls`` takes token 0, ``mean`` averages the gene tokens
        (``[CLS]`` and padding excluded), then the ``latent`` map when the model has one.
        Dropout follows ``self.training``."""
        valid = genes != PAD
        attend = valid[:, None, None, :]  # [N, 1, 1, L]: which keys may be attended
        hidden = self.encoder(self.embed(genes, bins, values, masked), attend)
        if self.cfg.pooling == "cls":
            cell = hidden[:, 0]
        else:
            genes_only = valid[:, 1:].unsqueeze(-1).to(hidden.dtype)
            cell = (hidden[:, 1:] * genes_only).sum(1) / genes_only.sum(1).clamp_min(1.0)
        if self.latent is not None:
            cell = self.latent(cell)
        return hidden, cell

    def decoder_metric(self, metric_weight: Optional[float] = None) -> Optional[Tensor]:
        """``S = (MᵀM / G)^(w/2)`` ``[C, C]`` (float32) of ``embedding: decoder_metric``, with
        ``M`` ``[G, C]`` the GEPC decoder's linear map of the cell embedding and ``w`` the
        ``metric_weight`` (``None``: the config's). At ``w = 1``
        ``‖(c₁ − c₂) S‖² = ‖M (c₁ − c₂)‖² / G`` (``mod.rs::decoder_metric``); at ``w = 0``
        ``S = I``. Through ``eigh`` in float64, eigenvalues below 0 counted as 0. ``None``
        without the decoder."""
        if self.gepc is None:
            return None
        w = self.cfg.metric_weight if metric_weight is None else metric_weight
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"metric_weight {w} is outside [0, 1]")
        with torch.no_grad():
            genes = self.embed.gene.weight[OFFSET:]
            m = self.gepc.linear_map(genes).double()
            gram = m @ m.T / max(m.shape[1], 1)
            eig, vecs = torch.linalg.eigh(gram)
            root = vecs * eig.clamp_min(0.0).pow(w / 2.0).unsqueeze(0)
            return (root @ vecs.T).float()

    def gepc_forward(self, cell: Tensor, detected: Optional[Tensor] = None) -> Optional[Tensor]:
        """The GEPC predictions ``[N, n_genes]`` for cell embeddings ``[N, C]`` and, for a
        decoder with ``gepc_detected``, the cells' covariates ``[N]`` (``None`` without the
        decoder)."""
        if self.gepc is None:
            return None
        return self.gepc(cell, self.embed.gene.weight[OFFSET:], detected)

    def forward(
        self, genes: Tensor, bins: Tensor, values: Tensor, masked: Tensor, detected: Optional[Tensor] = None
    ) -> Outputs:
        """``genes``, ``bins`` ``[N, L]`` int64; ``values`` ``[N, L]`` float; ``masked`` ``[N, L]`` bool;
        ``detected`` ``[N]`` the GEPC decoder's genes-detected covariates (optional)."""
        hidden, cell = self.encode(genes, bins, values, masked)
        return Outputs(
            hidden=hidden,
            mgem=self.mgem(hidden),
            cell=cell,
            proj=self.contrastive(cell),
            gepc=self.gepc_forward(cell, detected),
        )

    def mgem_loss(self, out: Outputs, batch: Mapping[str, Tensor]) -> Tensor:
        """The MGEM loss on the batch's masked tokens."""
        if self.cfg.expression == "binned":
            return mgem_cross_entropy(out.mgem, batch["target_bins"], batch["masked"], self.cfg.label_smoothing)
        return mgem_mse(out.mgem, batch["target_values"], batch["masked"])

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        """Forward plus losses for a two-view batch.

        ``batch`` holds ``genes``, ``bins`` (int64), ``values`` (float), ``masked`` (bool),
        ``target_bins`` (int64) and ``target_values`` (float), all ``[N, L]``, and for the
        GEPC loss ``profile`` ``[N, n_genes]`` (each row's dense log1p-normalised cell
        profile) and, for ``gepc_detected``, optionally ``detected`` ``[N]`` (computed from
        ``profile`` when absent and the targets are log1p; required for scaled targets); rows ``i`` and ``i + N/2`` are the two views of one cell. Returns tensors
        ``total`` (differentiable: ``w_mgem * mgem + w_contrastive * contrastive``, plus
        ``w_gepc * gepc`` when the model has the decoder and the batch a ``profile``),
        ``mgem``, ``contrastive``, ``gepc`` (only when computed) and the forward ``out``.
        Dropout follows ``self.training``.
        """
        detected = batch.get("detected")
        if detected is None and self.cfg.gepc_detected and "profile" in batch and self.cfg.gepc_target == "log1p":
            detected = detected_covariate(batch["profile"])
        out = self(batch["genes"], batch["bins"], batch["values"], batch["masked"], detected)
        mgem = self.mgem_loss(out, batch)
        con = nt_xent(out.proj, self.cfg.temperature)
        total = mgem * self.cfg.w_mgem + con * self.cfg.w_contrastive
        res: dict[str, Any] = {"mgem": mgem, "contrastive": con, "out": out}
        if out.gepc is not None and "profile" in batch:
            weight = None
            if self.cfg.gepc_genes == "unseen":
                weight = unseen_genes(batch["genes"], batch["masked"], out.gepc.shape[1])
            gepc = gepc_mse(out.gepc, batch["profile"], weight)
            total = total + gepc * self.cfg.w_gepc
            res["gepc"] = gepc
        res["total"] = total
        return res


def decays(name: str) -> bool:
    """Whether AdamW weight decay applies to a parameter (``worker/src/params.rs::decays``):
    not to biases (the GEPC gene biases included), LayerNorms, embeddings (``embed.*``) or
    the continuous ``mask`` vector."""
    return not (name.endswith(".bias") or "norm" in name or name.startswith("embed.") or name.endswith(".mask"))


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """PyTorch param groups matching the Rust optimizer's decay / no-decay split."""
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if decays(n)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0},
    ]
