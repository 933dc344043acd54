"""Cross-check of the Rust scfm model against the independent PyTorch module in ``scfm_ref.py``
(the network of the ``scfm_torch`` package in ``python/``).

``scfm-worker reference --out DIR`` writes, for a few small configurations, the initial
weights, a padded two-view batch with every forward output, the losses and all parameter
gradients, and the weights after three clipped AdamW steps; the case with the GEPC decoder
also writes the batch's dense cell profiles, the decoder's predictions and its loss. This
test rebuilds the model in PyTorch from the weights alone and compares everything (absolute
tolerance 1e-5, rtol 0).

The worker binary is taken from ``$SCFM_WORKER_BIN`` or ``<repo>/target/release/scfm-worker``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scfm_ref import (  # noqa: E402
    PAD,
    ScfmRef,
    adamw_param_groups,
    decays,
    detected_covariate,
    nt_xent,
    sinusoidal_table,
)

REPO = Path(__file__).resolve().parents[2]
CASES = [
    "binned_cls",
    "continuous_sin_mean",
    "binned_learned",
    "binned_gepc",
    "continuous_gepc_scaled",
    "continuous_gepc_unseen",
    "continuous_gepc_per_gene",
    "continuous_gepc_detected",
    "continuous_latent_per_gene",
    "binned_cls_latent",
]
ATOL = 1e-5
#: Relative part of the tolerance for the float32 global gradient norms (see below).
NORM_RTOL = 2e-6


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    """Runs the built worker's reference exporter once into a temporary directory."""
    binary = Path(os.environ.get("SCFM_WORKER_BIN", REPO / "target" / "release" / "scfm-worker"))
    if not binary.is_file() or not os.access(binary, os.X_OK):
        pytest.fail(
            f"scfm-worker binary not found or not executable at {binary}; build it with "
            "`cargo build --release -p scfm-worker` or set SCFM_WORKER_BIN",
            pytrace=False,
        )
    out = tmp_path_factory.mktemp("scfm_reference")
    proc = subprocess.run([str(binary), "reference", "--out", str(out)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(
            f"`{binary} reference --out {out}` exited with {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
            pytrace=False,
        )
    for case in CASES:
        for f in ("config.json", "model.safetensors", "io.safetensors", "trained.safetensors"):
            assert (out / case / f).is_file(), f"reference export lacks {case}/{f}"
    return out


class Case:
    """One exported reference case."""

    def __init__(self, root: Path, name: str):
        d = root / name
        self.name = name
        self.meta = json.loads((d / "config.json").read_text())
        self.model_cfg = self.meta["model"]
        self.n_genes = self.meta["n_genes"]
        self.weights = load_file(str(d / "model.safetensors"))
        self.io = load_file(str(d / "io.safetensors"))
        self.trained = load_file(str(d / "trained.safetensors"))
        io = self.io
        # Integer and boolean inputs are stored as float32.
        self.batch = {
            "genes": io["genes"].long(),
            "bins": io["bins"].long(),
            "values": io["values"],
            "masked": io["masked"].bool(),
            "target_bins": io["target_bins"].long(),
            "target_values": io["target_values"],
        }
        if "profile" in io:  # the GEPC targets, exported for models with the decoder
            self.batch["profile"] = io["profile"]
        if "detected" in io:  # the decoder's genes-detected covariates
            self.batch["detected"] = io["detected"]

    @property
    def has_gepc(self) -> bool:
        """Whether the case's model has the GEPC decoder."""
        return self.model_cfg.get("w_gepc", 0.0) > 0

    @property
    def scaled(self) -> bool:
        """Whether the GEPC targets are standardised per gene (``gepc_target: scaled``)."""
        return self.has_gepc and self.model_cfg.get("gepc_target", "log1p") == "scaled"

    def model(self) -> ScfmRef:
        """A fresh PyTorch model holding the exported initial weights (strict load)."""
        m = ScfmRef.from_config(self.model_cfg, self.n_genes)
        m.load_state_dict(self.weights, strict=True)
        return m


@pytest.fixture(scope="module", params=CASES)
def case(request, reference_dir) -> Case:
    return Case(reference_dir, request.param)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = ATOL) -> float:
    """``|got - want| <= atol`` elementwise (rtol 0); returns the max abs diff."""
    d = max_abs(got, want)
    assert torch.isfinite(got).all(), f"{what}: non-finite values in the PyTorch result"
    assert d <= atol, f"{what}: max abs diff {d:.3e} > atol {atol:.0e}"
    return d


# --------------------------------------------------------------------------------------
# Comparisons against the Rust export
# --------------------------------------------------------------------------------------


def test_export_is_consistent(case: Case):
    """The batch is a padded two-view batch with masked tokens, and every parameter has a gradient."""
    b = case.batch
    n, length = b["genes"].shape
    assert n % 2 == 0 and n >= 2
    assert (b["genes"][:, 0] == 1).all(), "[CLS] must be token 0 of every row"
    assert (b["genes"] == PAD).any(), "the reference batch should contain padding"
    assert b["masked"].any(), "the reference batch should contain masked tokens"
    assert not (b["masked"] & (b["genes"] == PAD)).any(), "padding must never be masked"
    assert length <= case.model_cfg["max_seq_len"]
    names = set(case.weights)
    assert {k[len("grad."):] for k in case.io if k.startswith("grad.")} == names
    assert set(case.trained) == names
    assert sum(t.numel() for t in case.weights.values()) == case.meta["n_params"]
    gepc_keys = {"profile", "out.gepc", "loss.gepc"}
    assert gepc_keys <= set(case.io) if case.has_gepc else not gepc_keys & set(case.io)
    assert ("gepc.detected" in names) == case.model_cfg.get("gepc_detected", False)
    latent = case.model_cfg.get("latent_dim")
    assert ("latent.weight" in names) == (latent is not None)
    if latent is not None:
        assert tuple(case.weights["latent.weight"].shape) == (latent, case.model_cfg["hidden"])
        assert tuple(case.io["out.cell"].shape)[-1] == latent
    scaled_keys = {"profile_log1p", "cells", "gene_mean", "gene_std"}
    assert scaled_keys <= set(case.io) if case.scaled else not scaled_keys & set(case.io)


def test_gepc_profiles_are_the_clean_cells(case: Case):
    """The GEPC targets are each view's whole cell: both views of a cell share one dense
    profile, and every gene token's true value is that gene's entry of its row."""
    if not case.has_gepc:
        pytest.skip("n/a: no GEPC decoder in this case")
    b = case.batch
    profile = case.io["profile_log1p"] if case.scaled else b["profile"]
    n = b["genes"].shape[0]
    assert profile.shape == (n, case.n_genes)
    assert torch.equal(profile[: n // 2], profile[n // 2 :])
    gene_tokens = b["genes"] > 1
    rows = torch.arange(n).unsqueeze(1).expand_as(b["genes"])[gene_tokens]
    cols = b["genes"][gene_tokens] - 2
    assert torch.equal(profile[rows, cols], b["target_values"][gene_tokens])


def test_detected_covariates_count_the_clean_cells_genes(case: Case):
    """The genes-detected covariate of each row is ``ln(1 + genes above 0) - 5`` of its
    clean log1p profile, and the model computes the same from the profile itself."""
    if not case.has_gepc:
        pytest.skip("no GEPC decoder in this case")
    profile = case.io["profile_log1p"] if case.scaled else case.batch["profile"]
    n = (profile > 0).sum(-1).double()
    want = (torch.log(1.0 + n) - 5.0).float()
    assert_close(case.io["detected"], want, "exported covariates", atol=1e-6)
    assert_close(detected_covariate(profile), want, "scfm_torch's covariates", atol=1e-6)
    assert n.max() > n.min(), "the reference cells should differ in genes detected"


def test_scaled_gepc_targets_are_the_standardised_profiles(case: Case):
    """With ``gepc_target: scaled`` the decoder's targets are each gene's log1p value
    standardised by the gene's population mean and std over the cells (std 1 for a gene
    without variation), clipped to ±``gepc_clip`` (10 when absent, as
    ``sc.pp.scale(max_value=10)``), with ddof 0."""
    if not case.scaled:
        pytest.skip("n/a: GEPC targets not scaled in this case")
    cells = case.io["cells"].double()
    mean = cells.mean(0)
    std = cells.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    assert_close(case.io["gene_mean"], mean.float(), "gene means", atol=1e-6)
    assert_close(case.io["gene_std"], std.float(), "gene stds", atol=1e-6)
    assert (case.io["gene_std"] == 1).any(), "the toy data should have a gene without variation"
    clip = float(case.model_cfg.get("gepc_clip", 10.0))
    z = (case.io["profile_log1p"].double() - mean) / std
    assert_close(case.batch["profile"], z.clamp(-clip, clip).float(), "standardised profiles", atol=1e-5)
    if clip < 10:
        assert (z.abs() > clip).any(), f"the toy profiles should reach the clip of {clip}"


def test_forward_and_losses_match_rust(case: Case):
    m = case.model().eval()
    with torch.no_grad():
        res = m.losses(case.batch)
    out = res["out"]
    diffs = {}
    outs = ("hidden", "mgem", "cell", "proj") + (("gepc",) if case.has_gepc else ())
    losses = ("mgem", "contrastive", "total") + (("gepc",) if case.has_gepc else ())
    assert (out.gepc is not None) == case.has_gepc
    for k in outs:
        diffs[f"out.{k}"] = assert_close(getattr(out, k), case.io[f"out.{k}"], f"{case.name} out.{k}")
    for k in losses:
        diffs[f"loss.{k}"] = assert_close(res[k].reshape(1), case.io[f"loss.{k}"], f"{case.name} loss.{k}")
    print(f"\n[{case.name}] forward max abs diffs: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))


def test_gradients_match_rust(case: Case):
    m = case.model().eval()
    m.zero_grad(set_to_none=True)
    m.losses(case.batch)["total"].backward()
    worst = ("", -1.0)
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{case.name}: no gradient for {name}"
        d = assert_close(p.grad, case.io[f"grad.{name}"], f"{case.name} grad.{name}")
        if d > worst[1]:
            worst = (name, d)
    print(f"\n[{case.name}] gradients: max abs diff {worst[1]:.2e} ({worst[0]})")


def test_adamw_steps_match_rust(case: Case):
    """Three steps on the same batch: zero grads, forward (no dropout), backward,
    clip_grad_norm_ to `clip`, AdamW; compares the pre-clip norms and the final weights."""
    opt_cfg = case.meta["adamw"]
    m = case.model().eval()
    opt = torch.optim.AdamW(
        adamw_param_groups(m, opt_cfg["weight_decay"]),
        lr=opt_cfg["lr"],
        betas=(opt_cfg["beta1"], opt_cfg["beta2"]),
        eps=opt_cfg["eps"],
    )
    norms = []
    for _ in range(opt_cfg["steps"]):
        opt.zero_grad(set_to_none=True)
        m.losses(case.batch)["total"].backward()
        norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), opt_cfg["clip"]).item())
        opt.step()
    want_norms = case.meta["grad_norms"]
    assert len(want_norms) == opt_cfg["steps"]
    # The global norm is one float32 reduction over all gradients; Rust reduces the flat
    # buffer in one pass, PyTorch takes per-tensor norms and then their norm, so the two
    # round differently. The norms reach ~80 (continuous case), where float32 spacing is
    # ~8e-6, hence a relative term on top of the absolute tolerance.
    norm_diff = max(abs(a - b) for a, b in zip(norms, want_norms))
    for a, b in zip(norms, want_norms):
        assert abs(a - b) <= ATOL + NORM_RTOL * abs(b), (
            f"{case.name}: grad norms {norms} vs Rust {want_norms} (max abs diff {norm_diff:.3e})"
        )
    assert max(want_norms) > opt_cfg["clip"], "clipping should be active in the reference run"
    worst = ("", -1.0)
    moved = 0.0
    state = m.state_dict()
    for name, want in case.trained.items():
        d = assert_close(state[name], want, f"{case.name} trained {name}")
        if d > worst[1]:
            worst = (name, d)
        moved = max(moved, max_abs(want, case.weights[name]))
    assert moved > 1e-3, "the reference weights did not change during training"
    print(
        f"\n[{case.name}] grad norms max abs diff {norm_diff:.2e}; "
        f"trained weights max abs diff {worst[1]:.2e} ({worst[0]})"
    )


# --------------------------------------------------------------------------------------
# Hand-computed checks of the PyTorch module itself
# --------------------------------------------------------------------------------------


def test_decay_split_matches_rust_rule():
    assert decays("encoder.layers.0.attn.qkv.weight")
    assert decays("mgem.out.weight") and decays("contrastive.fc2.weight")
    assert decays("gepc.cell.weight") and decays("gepc.gene.weight")
    for name in ("encoder.layers.0.attn.qkv.bias", "encoder.layers.1.norm1.weight", "encoder.norm.bias",
                 "mgem.norm.weight", "embed.gene.weight", "embed.expr.fc1.weight", "embed.expr.mask",
                 "embed.pos.weight", "gepc.bias", "gepc.cell.bias"):
        assert not decays(name), name


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_nt_xent_hand_computed(tau):
    """Rows 0/2 and 1/3 are pairs. Row 0 = (1, 0) has similarities 0, 1, 0 to rows 1, 2, 3;
    every anchor sees the same pattern, so the loss is -log(e^{1/τ} / (2 + e^{1/τ}))."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    want = -math.log(math.exp(1 / tau) / (2 + math.exp(1 / tau)))
    got = nt_xent(z, tau).item()
    assert abs(got - want) < 1e-6, f"{got} vs {want}"


def test_nt_xent_general_formula():
    """A non-symmetric 4x2 case against the formula written out per anchor."""
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.3, -1.0], [0.8, 0.5], [-0.4, -0.9]]), dim=1)
    tau = 0.3
    n2, b = 4, 2
    total = 0.0
    for i in range(n2):
        logits = {j: float(z[i] @ z[j]) / tau for j in range(n2) if j != i}
        pos = (i + b) % n2
        total += -(logits[pos] - math.log(sum(math.exp(v) for v in logits.values())))
    want = total / n2
    got = nt_xent(z, tau).item()
    assert abs(got - want) < 1e-6, f"{got} vs {want}"


@pytest.mark.parametrize("hidden", [8, 7])
def test_sinusoidal_table_formula(hidden):
    t = sinusoidal_table(12, hidden).double()
    for p in range(12):
        for f in range(hidden):
            angle = p / 10000 ** ((f - f % 2) / hidden)
            want = math.sin(angle) if f % 2 == 0 else math.cos(angle)
            assert abs(t[p, f].item() - want) < 1e-5, (p, f)


def test_padding_does_not_change_real_tokens(case: Case):
    """Appending PAD columns leaves every real token's output, the pooled cell, the
    projection and the losses unchanged (PyTorch model only)."""
    extra = 3
    b = case.batch
    length = b["genes"].shape[1]
    cfg = dict(case.model_cfg, max_seq_len=max(case.model_cfg["max_seq_len"], length + extra))
    m = ScfmRef.from_config(cfg, case.n_genes)
    state = dict(case.weights)
    if "embed.pos.weight" in state:  # longer learned table: keep the exported rows, init the rest
        pos = m.embed.pos.weight.detach().clone()
        pos[: state["embed.pos.weight"].shape[0]] = state["embed.pos.weight"]
        state["embed.pos.weight"] = pos
    m.load_state_dict(state, strict=True)
    m.eval()

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype)], dim=1)

    # Padding columns carry arbitrary (non-zero) bins/values: they must not matter.
    long = {
        "genes": pad(b["genes"], PAD),
        "bins": pad(b["bins"], 3),
        "values": pad(b["values"], 2.5),
        "masked": pad(b["masked"], False),
        "target_bins": pad(b["target_bins"], 1),
        "target_values": pad(b["target_values"], 1.0),
    }
    for k in ("profile", "detected"):  # per cell, not per token: unchanged by padding
        if k in b:
            long[k] = b[k]
    with torch.no_grad():
        short_res, long_res = m.losses(b), m.losses(long)
    s, lo = short_res["out"], long_res["out"]
    real = b["genes"] != PAD
    assert_close(lo.hidden[:, :length][real], s.hidden[real], "hidden of real tokens")
    assert_close(lo.mgem[:, :length][real], s.mgem[real], "mgem of real tokens")
    assert_close(lo.cell, s.cell, "cell embedding")
    assert_close(lo.proj, s.proj, "projection")
    if case.has_gepc:
        assert_close(lo.gepc, s.gepc, "GEPC predictions")
    for k in short_res.keys() - {"out"}:
        assert_close(long_res[k], short_res[k], f"loss.{k}")


def test_train_mode_applies_dropout(case: Case):
    """With dropout > 0, train mode is stochastic and eval mode is deterministic."""
    cfg = dict(case.model_cfg, dropout=0.3)
    m = ScfmRef.from_config(cfg, case.n_genes)
    m.load_state_dict(case.weights, strict=True)
    m.train()
    torch.manual_seed(0)
    a = m.losses(case.batch)["out"].hidden
    b = m.losses(case.batch)["out"].hidden
    assert max_abs(a, b) > 1e-3
    m.eval()
    with torch.no_grad():
        c = m.losses(case.batch)["out"].hidden
        d = m.losses(case.batch)["out"].hidden
    assert max_abs(c, d) == 0.0
