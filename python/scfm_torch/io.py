"""Loading an scfm export folder (``scfm export MODEL --out DIR``, ``worker/src/infer/export.rs``).

The folder holds::

    config.json        {"format": "scfm-export", "version": 1, "model": {...ModelConfig...},
                        "n_genes", "target_sum", "step", "source", "model_sha256"}
    model.safetensors  float32 weights by PyTorch state_dict name
    vocab.tsv          token_id, gene_id, gene_symbol (token id = row + 2)
    README.md          model card

:func:`load` checks it as the Rust loader does (``worker/src/infer/load.rs``): the format
and version, the vocabulary's length against ``n_genes``, the SHA-256 of the weights against
``model_sha256``, and a strict load (no tensor missing, none left over, shapes equal).
Every problem raises :class:`ExportError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .model import OFFSET, ScfmModel
from .tokenizer import VocabEntry

#: ``format`` of an export's ``config.json``.
EXPORT_FORMAT = "scfm-export"
#: The newest export layout version this package reads.
EXPORT_VERSION = 1
#: Header line of ``vocab.tsv``.
VOCAB_HEADER = "token_id\tgene_id\tgene_symbol"

#: A token id as Rust's ``i64::from_str`` reads it.
_TOKEN_ID = re.compile(r"[+-]?[0-9]+")

PathLike = Union[str, Path]


class ExportError(ValueError):
    """An export folder that cannot be loaded; the message names the file."""

    def __init__(self, path: PathLike, message: str):
        super().__init__(f"{path}: {message}")
        self.path = Path(path)


@dataclass
class ExportConfig:
    """``config.json`` of an export folder (``ExportConfig`` in ``load.rs``)."""

    format: str
    version: int
    model: dict[str, Any]
    n_genes: int
    target_sum: float
    step: int
    source: str
    model_sha256: str


def read_config(path: PathLike) -> ExportConfig:
    """Reads and checks an export's ``config.json`` (format, version, fields)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(path, f"cannot read: {e}") from e
    if not isinstance(raw, dict):
        raise ExportError(path, "malformed: expected a JSON object")
    if raw.get("format") != EXPORT_FORMAT or not isinstance(raw.get("version"), int) or raw["version"] > EXPORT_VERSION:
        raise ExportError(
            path,
            f"format {raw.get('format')!r} version {raw.get('version')!r} is not an scfm export this "
            f"package reads (format {EXPORT_FORMAT!r}, version <= {EXPORT_VERSION})",
        )
    fields = ExportConfig.__dataclass_fields__
    missing = sorted(set(fields) - set(raw))
    unknown = sorted(set(raw) - set(fields))
    if missing or unknown:
        raise ExportError(path, f"malformed: missing fields {missing}, unknown fields {unknown}")
    return ExportConfig(**raw)


def read_vocab(path: PathLike) -> list[VocabEntry]:
    """Parses ``vocab.tsv``: the header, then ``token_id<TAB>gene_id<TAB>gene_symbol`` lines
    whose token ids are ``2, 3, ...`` (``parse_vocab_tsv`` in Rust)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(path, f"cannot read: {e}") from e
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != VOCAB_HEADER:
        raise ExportError(path, f"bad header line {lines[0] if lines else None!r}; expected {VOCAB_HEADER!r}")
    vocab = []
    for i, line in enumerate(lines[1:]):
        fields = line.split("\t")
        expect = i + OFFSET
        if len(fields) != 3 or not _TOKEN_ID.fullmatch(fields[0]) or int(fields[0]) != expect:
            raise ExportError(path, f"line {i + 2}: expected `{expect}<TAB>gene_id<TAB>gene_symbol`, found {line!r}")
        vocab.append(VocabEntry(gene_id=fields[1], symbol=fields[2]))
    return vocab


def read_weights(path: PathLike, sha256: str) -> dict[str, torch.Tensor]:
    """Reads ``model.safetensors``, checking its SHA-256 against ``sha256`` and that every
    tensor is float32."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ExportError(path, f"cannot read: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ExportError(path, f"SHA-256 {digest} does not match model_sha256 {sha256} in config.json")
    try:
        weights = load_safetensors(data)
    except SafetensorError as e:
        raise ExportError(path, f"not valid safetensors: {e}") from e
    for name, t in weights.items():
        if t.dtype != torch.float32:
            raise ExportError(path, f"tensor `{name}` is {t.dtype}, expected float32")
    return weights


def load(path: PathLike, device: Union[torch.device, str] = "cpu") -> ScfmModel:
    """Loads the export folder ``path`` as an :class:`ScfmModel` in evaluation mode on
    ``device``, carrying its vocabulary (``model.vocab``), normalisation target
    (``model.target_sum``) and ``config.json`` (``model.export_config``)."""
    root = Path(path)
    if not root.is_dir():
        raise ExportError(root, "not a directory (expected an scfm export folder)")
    cfg_path = root / "config.json"
    cfg = read_config(cfg_path)
    vocab = read_vocab(root / "vocab.tsv")
    if len(vocab) != cfg.n_genes:
        raise ExportError(cfg_path, f"n_genes {cfg.n_genes} but vocab.tsv has {len(vocab)} genes")
    weights_path = root / "model.safetensors"
    weights = read_weights(weights_path, cfg.model_sha256)
    try:
        model = ScfmModel.from_config(cfg.model, cfg.n_genes)
    except (TypeError, ValueError) as e:
        raise ExportError(cfg_path, f"bad model config: {e}") from e
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ExportError(weights_path, f"does not fit the model of config.json: {e}") from e
    model.vocab = vocab
    model.target_sum = float(cfg.target_sum)
    model.export_config = cfg
    return model.to(device).eval()
