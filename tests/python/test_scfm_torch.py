"""The ``scfm_torch`` package (``python/``) against the Rust ``scfm embed``.

* Tokens: for export folders written here (random weights, varied vocabularies, sequence
  lengths, bin counts and normalisation targets), the package's inference tokens of the
  real datasets ``data/pbmc68k_counts.h5ad`` and the first 500 cells of
  ``data/mouse10k.h5ad`` equal those of ``scfm-worker tokens`` (the batch ``scfm embed``
  feeds the model) exactly: token ids, bins and float32 values.
* Embeddings: tiny models trained by ``scfm-worker train`` for a few steps (with the GEPC
  decoder; both poolings, both expression encodings, one with a ``latent_dim``
  bottleneck), exported by ``scfm-worker export`` and run through ``scfm-worker embed``,
  give the package's ``embed`` to 1e-4; so do the
  export folders written here.
* Loading: strict loads and clear errors for malformed export folders (no worker needed).

The worker binary is taken from ``$SCFM_WORKER_BIN`` or ``<repo>/target/release/scfm-worker``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))

import scfm_torch  # noqa: E402
from scfm_torch import ExportError, ScfmModel, VocabEntry  # noqa: E402
from scfm_torch.tokenizer import partition_point, align_genes, collate, quantile_bins, tokenize  # noqa: E402

torch.set_num_threads(1)

PBMC = REPO / "data" / "pbmc68k_counts.h5ad"
MOUSE = REPO / "data" / "mouse10k.h5ad"
#: Tolerance of the embeddings (max abs difference of the pooled vectors).
EMBED_ATOL = 1e-4

#: A small architecture; tests override single fields.
BASE_MODEL = dict(
    hidden=16,
    n_layers=1,
    n_heads=2,
    ffn_dim=32,
    max_seq_len=64,
    dropout=0.1,
    expression="binned",
    n_bins=51,
    positional="none",
    mask_ratio=0.15,
    label_smoothing=0.0,
    projection_dim=8,
    temperature=0.1,
    w_mgem=1.0,
    w_contrastive=0.1,
    w_gepc=1.0,
    pooling="cls",
)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def worker_binary() -> Path:
    """The built worker, or a test failure saying how to get it."""
    binary = Path(os.environ.get("SCFM_WORKER_BIN", REPO / "target" / "release" / "scfm-worker"))
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"scfm-worker binary not found or not executable at {binary}; build it with "
            "`cargo build --release -p scfm-worker` or set SCFM_WORKER_BIN",
            pytrace=False,
        )
    return binary


def run_worker(*args: object) -> subprocess.CompletedProcess:
    """Runs the worker with ``args``; a failure shows its output."""
    cmd = [str(worker_binary()), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def write_export(root: Path, model: ScfmModel, vocab: list[VocabEntry], target_sum: float) -> Path:
    """Writes ``model`` as an export folder the way ``scfm export`` lays it out."""
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"), {"format": "pt"})
    lines = ["token_id\tgene_id\tgene_symbol"] + [f"{i + 2}\t{e.gene_id}\t{e.symbol}" for i, e in enumerate(vocab)]
    (root / "vocab.tsv").write_text("\n".join(lines) + "\n")
    write_config(
        root,
        {
            "format": "scfm-export",
            "version": 1,
            "model": dataclasses.asdict(model.cfg),
            "n_genes": len(vocab),
            "target_sum": target_sum,
            "step": 0,
            "source": "test_scfm_torch",
            "model_sha256": "",
        },
    )
    return root


def write_config(root: Path, config: dict) -> None:
    """Writes ``config.json`` with ``model_sha256`` set to the current weights' digest."""
    config = dict(config, model_sha256=hashlib.sha256((root / "model.safetensors").read_bytes()).hexdigest())
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def random_export(root: Path, vocab: list[VocabEntry], target_sum: float = 1e4, seed: int = 0, **model: object) -> Path:
    """An export folder of a randomly initialised model of ``BASE_MODEL`` with ``model``
    overrides (LayerNorms and biases perturbed so that they matter)."""
    torch.manual_seed(seed)
    m = ScfmModel.from_config(dict(BASE_MODEL, **model), len(vocab))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return write_export(root, m, vocab, target_sum)


def rust_tokens(export: Path, data: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``scfm-worker tokens``: the padded inference batch of every cell, and its metadata."""
    run_worker("tokens", export, data, "--out", out)
    with open(out, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header_len)).get("__metadata__", {})
    return load_file(str(out)), meta


def rust_embed(export: Path, data: Path, out: Path, *extra: str) -> np.ndarray:
    """``obsm['X_scfm']`` of ``scfm-worker embed`` on the CPU (``extra``: more flags)."""
    run_worker("embed", export, data, "--out", out, "--device", "cpu", "--threads", "1", *extra)
    return np.asarray(anndata.read_h5ad(out).obsm["X_scfm"])


def assert_same_tokens(export: Path, data: Path, tmp: Path) -> None:
    """The package's tokens of ``data`` under ``export`` equal the worker's bit for bit."""
    want, meta = rust_tokens(export, data, tmp / "tokens.safetensors")
    model = scfm_torch.load(export)
    tokens, alignment = tokenize(model, anndata.read_h5ad(data))
    got = collate(tokens)
    assert (meta["matched_by"], int(meta["genes_matched"])) == (alignment.by, alignment.matched)
    assert got["genes"].shape == want["genes"].shape, f"{got['genes'].shape} vs {want['genes'].shape}"
    for k in ("genes", "bins"):
        diff = int((got[k] != want[k].long()).sum())
        assert diff == 0, f"{diff} {k} differ"
    values = got["values"].numpy().view(np.uint32)
    want_values = want["values"].numpy().view(np.uint32)
    diff = int((values != want_values).sum())
    assert diff == 0, f"{diff} of {values.size} values differ in their float32 bits"


def pbmc_vocab(seed: int) -> list[VocabEntry]:
    """The PBMC genes shuffled, a tenth left out, and three genes the data lacks."""
    names = list(anndata.read_h5ad(PBMC).var_names)
    rng = np.random.default_rng(seed)
    kept = [names[i] for i in rng.permutation(len(names))[: len(names) * 9 // 10]]
    return [VocabEntry(g, g) for g in kept + ["NOT_A_GENE_1", "NOT_A_GENE_2", "NOT_A_GENE_3"]]


@pytest.fixture(scope="module")
def mouse_ids(tmp_path_factory) -> Path:
    """The first 500 cells of the mouse dataset (genes named by Ensembl id)."""
    path = tmp_path_factory.mktemp("mouse") / "mouse500_ids.h5ad"
    anndata.read_h5ad(MOUSE)[:500].copy().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def mouse_symbols(tmp_path_factory) -> Path:
    """The same cells with genes named by symbol (one symbol is repeated)."""
    a = anndata.read_h5ad(MOUSE)[:500].copy()
    a.var_names = list(a.var["gene_symbols"].astype(str))
    path = tmp_path_factory.mktemp("mouse") / "mouse500_symbols.h5ad"
    a.write_h5ad(path)
    return path


def mouse_vocab(seed: int, n: int = 900) -> list[VocabEntry]:
    """``n`` of the mouse genes (id and symbol) in a shuffled order."""
    var = anndata.read_h5ad(MOUSE, backed="r").var
    ids, symbols = list(var.index), list(var["gene_symbols"].astype(str))
    order = np.random.default_rng(seed).permutation(len(ids))[:n]
    return [VocabEntry(ids[i], symbols[i]) for i in order]


# --------------------------------------------------------------------------------------
# Tokens: bit-equality with the worker
# --------------------------------------------------------------------------------------

TOKEN_CASES = {
    # name: (dataset, export settings)
    "pbmc_truncated": ("pbmc", dict(max_seq_len=64, n_bins=51)),
    "pbmc_whole_cells_many_bins": ("pbmc", dict(max_seq_len=512, n_bins=101, target_sum=3141.59)),
    "pbmc_two_bins_continuous": ("pbmc", dict(max_seq_len=100, n_bins=2, expression="continuous")),
    "mouse_ids": ("mouse_ids", dict(max_seq_len=128, n_bins=11, target_sum=5000.0)),
    "mouse_symbols_truncated": ("mouse_symbols", dict(max_seq_len=32, n_bins=21)),
}


#: The symbol-named mouse input repeats one gene name, as the real data does.
DUPLICATE_NAMES = pytest.mark.filterwarnings("ignore:Variable names are not unique")


@DUPLICATE_NAMES
@pytest.mark.parametrize("name", list(TOKEN_CASES))
def test_tokens_equal_rust(name: str, tmp_path: Path, request):
    data_name, settings = TOKEN_CASES[name]
    settings = dict(settings)
    target_sum = settings.pop("target_sum", 1e4)
    if data_name == "pbmc":
        data, vocab = PBMC, pbmc_vocab(seed=len(name))
    else:
        data, vocab = request.getfixturevalue(data_name), mouse_vocab(seed=len(name))
    export = random_export(tmp_path / "export", vocab, target_sum=target_sum, **settings)
    assert_same_tokens(export, data, tmp_path)


@DUPLICATE_NAMES
def test_mouse_symbols_match_by_symbol(mouse_symbols: Path):
    """The symbol-named input aligns by symbol; the repeated symbol maps once."""
    vocab = mouse_vocab(seed=0, n=1000)
    names = list(anndata.read_h5ad(mouse_symbols, backed="r").var_names)
    a = align_genes(names, vocab)
    assert a.by == "gene_symbol"
    mapped = a.map[a.map >= 0]
    assert len(set(mapped.tolist())) == len(mapped) == a.matched
    assert a.matched == len(set(names))


# --------------------------------------------------------------------------------------
# Embeddings: equality with the worker
# --------------------------------------------------------------------------------------

TRAINED = {
    # name: model overrides of the training file
    "binned_cls": "expression: binned\n  pooling: cls\n  positional: none",
    "binned_mean_learned": "expression: binned\n  pooling: mean\n  positional: learned",
    "continuous_cls_sinusoidal": "expression: continuous\n  pooling: cls\n  positional: sinusoidal",
    "continuous_mean": "expression: continuous\n  pooling: mean\n  positional: none",
    # the bottleneck: an 8-wide embedding read by the per-gene decoder
    "continuous_mean_latent": "expression: continuous\n  pooling: mean\n  positional: none\n  gepc_decoder: per_gene\n  latent_dim: 8",
    # the embedding in the decoder's metric, for both decoder forms
    "continuous_mean_metric": "expression: continuous\n  pooling: mean\n  positional: none\n  gepc_decoder: per_gene\n  gepc_detected: true\n  embedding: decoder_metric",
    "binned_mean_metric_query": "expression: binned\n  pooling: mean\n  positional: none\n  gepc_decoder: gene_query\n  embedding: decoder_metric",
}


@pytest.fixture(scope="module", params=list(TRAINED))
def trained_export(request, tmp_path_factory) -> Path:
    """A tiny model with the GEPC decoder trained for 5 steps on the PBMC counts, exported."""
    root = tmp_path_factory.mktemp(f"trained_{request.param}")
    config = root / "train.yaml"
    config.write_text(
        f"""data:
  path: {PBMC}
  target_sum: 10000
model:
  preset: minimal
  hidden: 32
  n_layers: 2
  n_heads: 4
  ffn_dim: 64
  max_seq_len: 96
  n_bins: 21
  projection_dim: 16
  w_gepc: 1.0
  {TRAINED[request.param]}
training:
  seed: 3
  batch_size: 16
  max_steps: 5
  warmup_steps: 1
  lr: 0.01
  eval_every: 1000
  log_every: 1
  threads: 1
  device: cpu
checkpoint:
  url: {root / "run"}
  every_steps: 5
"""
    )
    run_worker("train", "--config", config)
    export = root / "export"
    run_worker("export", root / "run", "--out", export)
    return export


def test_trained_export_loads_strictly(trained_export: Path):
    model = scfm_torch.load(trained_export)
    cfg = json.loads((trained_export / "config.json").read_text())
    assert not model.training
    assert model.export_config.step == cfg["step"] == 5
    assert model.cfg.w_gepc == 1.0 and model.gepc is not None
    weights = load_file(str(trained_export / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_trained_embed_equals_rust(trained_export: Path, tmp_path: Path):
    want = rust_embed(trained_export, PBMC, tmp_path / "embedded.h5ad")
    model = scfm_torch.load(trained_export)
    got = scfm_torch.embed(model, anndata.read_h5ad(PBMC))
    assert got.shape == want.shape == (700, model.cfg.cell_dim)
    assert model.cfg.cell_dim == (8 if "latent" in trained_export.parent.name else model.cfg.hidden)
    uns = anndata.read_h5ad(tmp_path / "embedded.h5ad").uns["scfm"]
    assert int(uns["embedding_dim"]) == model.cfg.cell_dim and int(uns["hidden"]) == model.cfg.hidden
    diff = float(np.abs(got - want).max())
    print(f"\n[{trained_export.parent.name}] embeddings max abs diff {diff:.2e}")
    assert diff <= EMBED_ATOL, f"max abs diff {diff:.3e}"
    # The pooled vectors themselves, not unit rows.
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    if model.cfg.read_out == "decoder_metric":
        w = model.cfg.metric_weight  # the `minimal` preset's: 0.5
        suffix = "" if w == 1.0 else f"({w})"
        assert uns["embedding"] == f"{model.cfg.pooling}+decoder_metric{suffix}", dict(uns)
        # The pooled read-out on both sides (`--embedding pooled`), and the metric itself:
        # at weight 1 distances of the read-out are the RMS distances of the decoded profiles.
        pooled = rust_embed(trained_export, PBMC, tmp_path / "pooled.h5ad", "--embedding", "pooled")
        assert anndata.read_h5ad(tmp_path / "pooled.h5ad").uns["scfm"]["embedding"] == model.cfg.pooling
        mine = scfm_torch.embed(model, anndata.read_h5ad(PBMC), embedding="pooled")
        assert float(np.abs(mine - pooled).max()) <= EMBED_ATOL
        assert float(np.abs(pooled @ model.decoder_metric().numpy() - want).max()) <= EMBED_ATOL
        with torch.no_grad():
            c = torch.from_numpy(pooled[:20]).double()
            m = model.gepc.linear_map(model.embed.gene.weight[2:]).double()
            decoded = c @ m
            d_dec = torch.cdist(decoded, decoded) / m.shape[1] ** 0.5
            full = c @ model.decoder_metric(1.0).double()
            d_emb = torch.cdist(full, full)
        assert torch.allclose(d_emb, d_dec, rtol=1e-3, atol=1e-4), float((d_emb - d_dec).abs().max())
        # Halfway along the geometric path (`--metric-weight 0.5`): the same on both sides,
        # named so, and its matrix squared is the decoder's metric.
        half = rust_embed(trained_export, PBMC, tmp_path / "half.h5ad", "--metric-weight", "0.5")
        assert anndata.read_h5ad(tmp_path / "half.h5ad").uns["scfm"]["embedding"] == (
            f"{model.cfg.pooling}+decoder_metric(0.5)"
        )
        mine = scfm_torch.embed(model, anndata.read_h5ad(PBMC), metric_weight=0.5)
        assert float(np.abs(mine - half).max()) <= EMBED_ATOL
        s_half = model.decoder_metric(0.5).double()
        assert torch.allclose(s_half @ s_half, model.decoder_metric(1.0).double(), rtol=1e-4, atol=1e-6)
        with pytest.raises(ValueError, match="metric_weight"):
            scfm_torch.embed(model, anndata.read_h5ad(PBMC), embedding="pooled", metric_weight=0.5)
        # A weight outside [0, 1] is refused and leaves the model's mode as it was.
        model.train()
        with pytest.raises(ValueError, match="outside"):
            scfm_torch.embed(model, anndata.read_h5ad(PBMC), metric_weight=1.5)
        assert model.training
        model.eval()


def test_trained_tokens_equal_rust(trained_export: Path, tmp_path: Path):
    assert_same_tokens(trained_export, PBMC, tmp_path)


@pytest.mark.parametrize("data_name", ["pbmc", "mouse_ids"])
def test_random_export_embed_equals_rust(data_name: str, tmp_path: Path, request):
    """A folder written here (not by the worker) embeds the same on both sides."""
    if data_name == "pbmc":
        data, vocab = PBMC, pbmc_vocab(seed=1)
    else:
        data, vocab = request.getfixturevalue(data_name), mouse_vocab(seed=1)
    export = random_export(tmp_path / "export", vocab, hidden=24, n_heads=3, n_layers=2, pooling="mean")
    want = rust_embed(export, data, tmp_path / "embedded.h5ad")
    got = scfm_torch.embed(scfm_torch.load(export), anndata.read_h5ad(data))
    diff = float(np.abs(got - want).max())
    assert diff <= EMBED_ATOL, f"max abs diff {diff:.3e}"


# --------------------------------------------------------------------------------------
# The package alone
# --------------------------------------------------------------------------------------


@pytest.fixture
def small_export(tmp_path: Path) -> Path:
    """A random export over the PBMC genes."""
    return random_export(tmp_path / "export", pbmc_vocab(seed=2), max_seq_len=48)


def test_embed_batching_layers_raw_and_mode(small_export: Path):
    """Batch size does not change the embeddings beyond float noise; counts can come from
    a layer or ``.raw``; the model's train/eval mode is left as it was."""
    model = scfm_torch.load(small_export)
    adata = anndata.read_h5ad(PBMC)[:150].copy()
    base = scfm_torch.embed(model, adata)
    assert np.abs(scfm_torch.embed(model, adata, batch_size=7) - base).max() <= 1e-5
    moved = adata.copy()
    moved.layers["counts"] = moved.X.copy()
    moved.raw = moved
    moved.X = sp.csr_matrix(moved.X.shape, dtype=np.float32)
    assert np.array_equal(scfm_torch.embed(model, moved, layer="counts"), base)
    assert np.array_equal(scfm_torch.embed(model, moved, use_raw=True), base)
    dense = adata.copy()
    dense.X = dense.X.toarray()
    assert np.array_equal(scfm_torch.embed(model, dense), base)
    model.train()
    assert np.array_equal(scfm_torch.embed(model, adata), base)
    assert model.training


def test_embed_rejects_bad_inputs(small_export: Path):
    model = scfm_torch.load(small_export)
    adata = anndata.read_h5ad(PBMC)[:5].copy()
    negative = adata.copy()
    negative.X = negative.X.copy()
    negative.X.data[3] = -1.0
    with pytest.raises(ValueError, match="bad count -1.0 at cell 0"):
        scfm_torch.embed(model, negative)
    unknown = adata.copy()
    unknown.var_names = [f"X{i}" for i in range(adata.n_vars)]
    with pytest.raises(ValueError, match="none of the input's"):
        scfm_torch.embed(model, unknown)
    with pytest.raises(ValueError, match="no layer 'counts'"):
        scfm_torch.embed(model, adata, layer="counts")
    with pytest.raises(ValueError, match="no .raw"):
        scfm_torch.embed(model, adata, use_raw=True)


def test_cells_without_genes_embed_from_cls(small_export: Path):
    """A cell with none of the model's genes is [CLS] alone (as in ``scfm embed``)."""
    model = scfm_torch.load(small_export)
    adata = anndata.read_h5ad(PBMC)[:3].copy()
    x = adata.X.toarray()
    x[1] = 0
    adata.X = sp.csr_matrix(x)
    tokens, _ = tokenize(model, adata)
    assert tokens[1].genes.tolist() == [scfm_torch.CLS]
    assert np.isfinite(scfm_torch.embed(model, adata)).all()


def test_align_genes_ids_symbols_and_duplicates():
    vocab = [VocabEntry("ENSG1", "CD3E"), VocabEntry("ENSG2", "MS4A1"), VocabEntry("ENSG3", "LYZ")]
    a = align_genes(["LYZ", "X", "CD3E"], vocab)
    assert (a.by, a.matched, a.n_model, a.map.tolist()) == ("gene_symbol", 2, 3, [2, -1, 0])
    a = align_genes(["ENSG2", "ENSG3"], vocab)
    assert (a.by, a.map.tolist()) == ("gene_id", [1, 2])
    assert abs(a.fraction - 2 / 3) < 1e-12
    assert align_genes(["A", "B"], vocab).matched == 0
    assert align_genes(["LYZ", "LYZ"], vocab).map.tolist() == [2, -1]
    # One id and one symbol match: ids win the tie.
    assert align_genes(["ENSG1", "MS4A1"], vocab).map.tolist() == [0, -1]


def test_quantile_bins_hand_computed():
    """Edges of 1..5 at quantiles 0, 1/3, 2/3, 1 are 1, 2.33, 3.67, 5: a value's bin is one
    more than the edges strictly below it; tied values share the lowest bin."""
    assert quantile_bins(np.array([3, 1, 5, 2, 4], np.float32), 5).tolist() == [3, 1, 4, 2, 4]
    assert quantile_bins(np.array([1, 1, 1, 7], np.float32), 4).tolist() == [1, 1, 1, 3]
    assert quantile_bins(np.array([2.5, 0.5], np.float32), 2).tolist() == [1, 1]
    assert quantile_bins(np.array([], np.float32), 51).tolist() == []
    rng = np.random.default_rng(0)
    v = rng.integers(1, 30, 200).astype(np.float32)  # integer quantiles: exact interpolation
    edges = np.quantile(v.astype(np.float64), np.linspace(0, 1, 10))
    assert np.array_equal(quantile_bins(v, 11), 1 + np.digitize(v, edges, right=True))


def testpartition_point_follows_rusts_binary_search():
    """On sorted edges it counts the edges below; on unsorted ones (float corner cases of the
    interpolation) it returns what Rust's binary search does, not the count."""
    edges = np.array([1, 2, 2, 5, 9], np.float32)
    for v in (0.5, 1, 2, 3, 9, 10):
        assert partition_point(edges, np.float32(v)) == int((edges < v).sum())
    # size 4: mid 2 (3 < 4, base 2), mid 3 (7 >= 4), then 2 + (3 < 4) = 3; two edges are below 4.
    assert partition_point(np.array([1, 5, 3, 7], np.float32), np.float32(4)) == 3
    assert partition_point(np.array([], np.float32), np.float32(1)) == 0


# --------------------------------------------------------------------------------------
# Loading errors
# --------------------------------------------------------------------------------------


def edit_config(root: Path, **fields: object) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(fields)
    (root / "config.json").write_text(json.dumps(cfg))


def test_load_rejects_wrong_format_and_version(small_export: Path):
    edit_config(small_export, format="hf-model")
    with pytest.raises(ExportError, match=r"config\.json: format 'hf-model' version 1 is not an scfm export"):
        scfm_torch.load(small_export)
    edit_config(small_export, format="scfm-export", version=2)
    with pytest.raises(ExportError, match=r"config\.json: .*version 2 .*version <= 1"):
        scfm_torch.load(small_export)


def test_load_rejects_tampered_weights(small_export: Path):
    path = small_export / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model\.safetensors: SHA-256 [0-9a-f]{64} does not match model_sha256"):
        scfm_torch.load(small_export)


def test_load_rejects_vocab_length_mismatch(small_export: Path):
    vocab = small_export / "vocab.tsv"
    vocab.write_text("".join(vocab.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ExportError, match=r"config\.json: n_genes \d+ but vocab\.tsv has \d+ genes"):
        scfm_torch.load(small_export)


def test_load_rejects_malformed_vocab(small_export: Path):
    vocab = small_export / "vocab.tsv"
    lines = vocab.read_text().splitlines()
    vocab.write_text("\n".join(lines[:3] + ["7\tGENE\tGENE"] + lines[4:]) + "\n")
    with pytest.raises(ExportError, match=r"vocab\.tsv: line 4: expected `4<TAB>gene_id<TAB>gene_symbol`"):
        scfm_torch.load(small_export)
    vocab.write_text("gene_id\tsymbol\n")
    with pytest.raises(ExportError, match=r"vocab\.tsv: bad header line"):
        scfm_torch.load(small_export)


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_load_is_strict(small_export: Path, change: str):
    """A tensor missing, one the model lacks, or a wrong shape is an error naming the file
    (with a matching digest, so that the strict load itself is what fails)."""
    path = small_export / "model.safetensors"
    weights = load_file(str(path))
    if change == "missing":
        del weights["gepc.bias"]
        pattern = r"Missing key\(s\).*gepc\.bias"
    elif change == "unexpected":
        weights["gepc.extra"] = torch.zeros(3)
        pattern = r"Unexpected key\(s\).*gepc\.extra"
    else:
        weights["mgem.out.bias"] = torch.zeros(7)
        pattern = r"size mismatch for mgem\.out\.bias"
    save_file(weights, str(path))
    cfg = json.loads((small_export / "config.json").read_text())
    write_config(small_export, cfg)
    with pytest.raises(ExportError, match=rf"model\.safetensors: does not fit the model of config\.json: (?s:.*){pattern}"):
        scfm_torch.load(small_export)


def test_load_rejects_gepc_weights_without_decoder(small_export: Path):
    """Weights with the GEPC decoder do not load into a config with ``w_gepc: 0``."""
    cfg = json.loads((small_export / "config.json").read_text())
    cfg["model"]["w_gepc"] = 0.0
    (small_export / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"Unexpected key\(s\)"):
        scfm_torch.load(small_export)


def test_load_rejects_non_folder_and_bad_json(tmp_path: Path, small_export: Path):
    with pytest.raises(ExportError, match="not a directory"):
        scfm_torch.load(tmp_path / "nowhere")
    (small_export / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match=r"config\.json: cannot read"):
        scfm_torch.load(small_export)


def test_length_groups_cover_every_row_at_the_least_padding():
    """``scfm_torch.groups.length_groups`` (scfm's ``Groups::of``): no grouping for equal
    lengths or too few rows; else every row once, groups longest first and at least 8
    rows, and no split of the sorted rows into as many groups pads fewer tokens."""
    from itertools import combinations

    from scfm_torch.groups import MIN_ROWS, length_groups

    assert length_groups([50] * 64) is None
    assert length_groups([200] + [10] * 9) is None
    assert length_groups([200] * 8 + [10] * 56, max_groups=1) is None
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(5, 120, size=40)]
    groups = length_groups(lengths, max_groups=3)
    assert groups is not None
    rows = sorted(r for g, _ in groups for r in g)
    assert rows == list(range(40))
    assert all(len(g) >= MIN_ROWS and length == max(lengths[r] for r in g) for g, length in groups)
    assert [length for _, length in groups] == sorted((length for _, length in groups), reverse=True)
    padded = sum(len(g) * length for g, length in groups)
    srt = sorted(lengths, reverse=True)
    best = min(
        sum((b - a) * srt[a] for a, b in zip((0,) + cut, cut + (40,)))
        for k in (1, 2)
        for cut in combinations(range(MIN_ROWS, 40 - MIN_ROWS + 1), k)
        if all(b - a >= MIN_ROWS for a, b in zip((0,) + cut, cut + (40,)))
    )
    assert padded == best
    # The case of worker/src/model/groups.rs's `three_clusters_give_three_groups_in_row_order`:
    # the same groups as scfm's, longest first, equal lengths in row order.
    ties = [(100, 50, 10, 10)[r % 4] for r in range(40)]
    assert length_groups(ties, max_groups=3) == [
        ([r for r in range(40) if r % 4 == 0], 100),
        ([r for r in range(40) if r % 4 == 1], 50),
        ([r for r in range(40) if r % 4 >= 2], 10),
    ]


def test_embed_in_length_groups_equals_whole_batches(small_export: Path):
    """Grouping a batch's rows by length changes no embedding beyond rounding (on cells
    whose lengths vary, so that the batches are grouped)."""
    from scfm_torch.groups import length_groups

    model = scfm_torch.load(small_export)
    adata = anndata.read_h5ad(PBMC)[:128].copy()
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    for r in range(0, 128, 2):  # every other cell keeps only its first 10 genes
        lo, hi = x.indptr[r], x.indptr[r + 1]
        x.data[lo + 10 : hi] = 0
    x.eliminate_zeros()
    adata.X = x
    tokens, _ = tokenize(model, adata)
    lengths = (collate(tokens[:64])["genes"] != scfm_torch.PAD).sum(1).tolist()
    assert length_groups(lengths) is not None
    whole = scfm_torch.embed(model, adata, length_groups=1)
    grouped = scfm_torch.embed(model, adata)
    assert np.abs(whole - grouped).max() <= 1e-5 * max(1.0, float(np.abs(whole).max()))
    with pytest.raises(ValueError, match="length_groups"):
        scfm_torch.embed(model, adata, length_groups=0)
