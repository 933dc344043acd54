"""PyTorch DDP side of the scaling benchmark (`cargo bench -p scfm-coordinator --bench scaling`).

Trains the scfm model in PyTorch (``ScfmRef`` and the AdamW parameter groups of
``tests/python/scfm_ref.py``, the model ``benches/torch_train.py`` times for
``scfm-worker bench``, with the same optimizer settings) under
``DistributedDataParallel`` with the gloo backend, one intra-op thread per process::

    python -m torch.distributed.run --standalone --nproc-per-node 2 benches/ddp_train.py \\
        --prepared DIR --preset configs/models/minimal.yaml --batch 32 --steps 60 --warmup 10

Batches have the shapes the scfm workers train on, drawn from the prepared dataset the scfm
side uses: each rank takes ``--batch`` random cells per step, every cell gives two views
whose length is what scfm's default augmentations leave of it -- the cell's counts thinned
binomially to a fraction ``U(0.2, 1)`` of its depth (``downsample: 0.8``; a view left
without counts keeps the cell's), its expressed genes then dropped with probability 0.3
(``gene_dropout: 0.3``; a view that would lose them all keeps them) -- capped at
``max_seq_len - 1``, plus ``[CLS]``; the rank's 2 x batch sequences are padded to their
longest; ``max(1, round(0.15 n))`` tokens are masked. With ``gepc_detected`` the batch
carries the decoder's genes-detected covariate. Gene ids and bins are random (they do not
change the cost). Batches are generated before timing (no data wait). The ``tuned`` model
runs each batch's rows in up to ``--length-groups`` groups of similar length, each padded
to its own longest row, as scfm's encoder does (``scfm_torch.groups.length_groups``, the same
choice of groups; checked on the first grouped batch to give the whole batch's losses).

Each step: ``zero_grad``, forward through DDP, MGEM + NT-Xent (``ScfmRef.losses``: NT-Xent
over the rank's own batch; scfm's spans the global batch, with an all-gather of the
embeddings), backward (DDP all-reduces the gradient buckets), global-norm clipping at 1.0,
AdamW. Steps ``warmup+1 .. steps`` are timed on every rank; the slowest rank's time gives
the global cells/s; rank 0 prints ``timing: start`` and ``timing: end`` around them (the
benchmark samples CPU use in between). Afterwards a standalone gloo all-reduce of a buffer
as large as the gradient is timed. Rank 0 prints one JSON line.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from scfm_ref import ScfmRef, adamw_param_groups, detected_covariate  # noqa: E402
from scfm_torch.groups import length_groups  # noqa: E402
from torch_train import group_index, query_index, tuned_losses  # noqa: E402

#: Tokenizer constants (common/src/config/model.rs): PAD 0, [CLS] 1, genes from 2.
PAD, CLS, OFFSET = 0, 1, 2
#: Default augmentations of the scfm manifest (`training.augment`, common/src/config/training.rs).
GENE_DROPOUT = 0.3
DOWNSAMPLE = 0.8


class Losses(nn.Module):
    """Wraps the model so that DDP's forward returns the losses: ``ScfmRef.losses``
    (``plain``) or ``torch_train.tuned_losses`` (``tuned``: only what the losses use)."""

    def __init__(self, model: ScfmRef, tuned: bool):
        super().__init__()
        self.model = model
        self.tuned = tuned

    def forward(self, batch: dict) -> tuple:
        if self.tuned:
            losses = tuned_losses(self.model, batch, batch["idx"], batch["sel"], batch.get("grouped"))
        else:
            losses = self.model.losses(batch)
        return losses["total"], losses["mgem"], losses["contrastive"]


def cell_counts(prepared: str) -> list:
    """Every cell's counts of its expressed genes in a prepared dataset (the shards' CSR rows)."""
    meta = json.load(open(os.path.join(prepared, "dataset.json")))
    cells = []
    for shard in meta["shards"]:
        with h5py.File(os.path.join(prepared, shard["path"]), "r") as f:
            indptr = f["X"]["indptr"][:]
            data = f["X"]["data"][:]
        cells.extend(np.rint(data[a:b]).astype(np.int64) for a, b in zip(indptr[:-1], indptr[1:]))
    return cells


def view_length(rng: np.random.Generator, counts: np.ndarray, max_seq_len: int) -> int:
    """Genes in one augmented view of a cell with these counts (as scfm's loader makes it:
    library-size thinning, then gene dropout), capped at ``max_seq_len - 1``."""
    kept = rng.binomial(counts, 1.0 - DOWNSAMPLE * rng.random())
    n = int((kept > 0).sum()) if kept.sum() > 0 else len(counts)
    if n > 1:
        left = int((rng.random(n) >= GENE_DROPOUT).sum())
        n = left if left > 0 else n
    return min(n, max_seq_len - 1)


def make_batch(rng: np.random.Generator, counts: list, cells: int, cfg, n_genes: int) -> dict:
    """One rank's batch: ``2 * cells`` sequences (rows i and i + cells are the views of cell i)."""
    picked = rng.choice(len(counts), size=cells, replace=False)
    seqs = [view_length(rng, counts[c], cfg.max_seq_len) for _view in range(2) for c in picked]
    length = 1 + max(seqs)
    rows = len(seqs)
    genes = np.full((rows, length), PAD, dtype=np.int64)
    bins = np.zeros((rows, length), dtype=np.int64)
    masked = np.zeros((rows, length), dtype=bool)
    for i, n in enumerate(seqs):
        genes[i, 0] = CLS
        genes[i, 1 : n + 1] = OFFSET + rng.choice(n_genes, size=n, replace=False)
        bins[i, 1 : n + 1] = rng.integers(1, cfg.n_bins, size=n)
        k = min(max(1, round(cfg.mask_ratio * n)), n)
        masked[i, 1 + rng.choice(n, size=k, replace=False)] = True
    target_bins = torch.from_numpy(bins)
    values = target_bins.float() * 0.1
    # The GEPC decoder's target: each row's dense profile over the vocabulary.
    profile = torch.zeros(rows, n_genes)
    profile.scatter_(1, (torch.from_numpy(genes[:, 1:]) - OFFSET).clamp_min(0), values[:, 1:])
    profile[:, 0] = 0.0
    batch = {
        "profile": profile,
        "genes": torch.from_numpy(genes),
        "bins": target_bins.masked_fill(torch.from_numpy(masked), cfg.n_bins),
        "values": values.masked_fill(torch.from_numpy(masked), 0.0),
        "masked": torch.from_numpy(masked),
        "target_bins": target_bins,
        "target_values": values,
    }
    if cfg.gepc_detected:
        # The decoder's genes-detected covariate, as scfm computes it from the cell's
        # log1p profile before any scaling (the GEPC target may be the scaled profile).
        batch["detected"] = detected_covariate(profile)
    return batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepared", required=True, help="prepared dataset (scfm prepare)")
    ap.add_argument("--preset", required=True, help="model preset YAML (configs/models/*.yaml)")
    ap.add_argument("--batch", type=int, default=32, help="cells per rank per step")
    ap.add_argument("--steps", type=int, default=60, help="steps in all")
    ap.add_argument("--warmup", type=int, default=10, help="untimed first steps")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--variant",
        choices=["plain", "tuned"],
        default="tuned",
        help="plain: the package's model and default AdamW; tuned: PyTorch written as well as scfm "
        "(see benches/torch_train.py) with fused AdamW",
    )
    ap.add_argument(
        "--length-groups",
        type=int,
        default=4,
        help="tuned: the encoder runs each batch's rows in up to this many groups of similar "
        "length, as scfm does (training.length_groups); 1: every row padded to the batch's longest",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model_cfg = yaml.safe_load(open(args.preset))
    meta = json.load(open(os.path.join(args.prepared, "dataset.json")))
    n_genes = int(meta["n_genes"])
    torch.manual_seed(args.seed)
    model = ScfmRef.from_config(model_cfg, n_genes)
    cfg = model.cfg
    model.train()
    tuned = args.variant == "tuned"
    ddp = DistributedDataParallel(Losses(model, tuned))
    opt = torch.optim.AdamW(
        adamw_param_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, fused=True if tuned else None
    )
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)

    counts = cell_counts(args.prepared)
    rng = np.random.default_rng([args.seed, rank])
    batches = [make_batch(rng, counts, args.batch, cfg, n_genes) for _ in range(args.steps)]
    grouped_steps = 0
    for b in batches:
        b["idx"], b["sel"] = query_index(b["masked"])
        groups = length_groups((b["genes"] != PAD).sum(1).tolist(), args.length_groups) if tuned else None
        if groups is not None:
            b["grouped"] = group_index(b, groups)
            grouped_steps += 1
    # The grouped losses equal the whole batch's (dropout off) on the first grouped batch.
    group_check = None
    first = next((b for b in batches if "grouped" in b), None)
    if first is not None:
        model.eval()
        with torch.no_grad():
            whole = tuned_losses(model, first, first["idx"], first["sel"])["total"].item()
            parts = tuned_losses(model, first, first["idx"], first["sel"], first["grouped"])["total"].item()
        model.train()
        group_check = abs(parts - whole) / max(abs(whole), 1e-12)
        if group_check > 1e-4:
            raise SystemExit(f"grouped losses differ from the whole batch's: {parts} vs {whole}")
    lengths = [b["genes"].shape[1] for b in batches]

    phases = np.zeros(3)  # forward + losses, backward (with DDP's all-reduce), clip + AdamW

    def step(b: dict, timed: bool) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total, mgem, con = ddp(b)
        t1 = time.perf_counter()
        total.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t3 = time.perf_counter()
        if timed:
            phases[:] += (t1 - t0, t2 - t1, t3 - t2)
        return total.item() + mgem.item() + con.item()

    for b in batches[: args.warmup]:
        step(b, False)
    dist.barrier()
    if rank == 0:
        print("timing: start", flush=True)  # marks for the benchmark's CPU sampling
    t = time.perf_counter()
    for b in batches[args.warmup :]:
        step(b, True)
    elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
    if rank == 0:
        print("timing: end", flush=True)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    timed = args.steps - args.warmup

    # A standalone gloo all-reduce as large as the gradient (fp32), for comparison.
    buf = torch.zeros(n_params)
    dist.barrier()
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(buf)
    ar = torch.tensor([(time.perf_counter() - t) / reps], dtype=torch.float64)
    dist.all_reduce(ar, op=dist.ReduceOp.MAX)

    if rank == 0:
        secs = elapsed.item()
        print(
            json.dumps(
                {
                    "world": world,
                    "params": n_params,
                    "threads": torch.get_num_threads(),
                    "cells_per_step": world * args.batch,
                    "timed_steps": timed,
                    "seconds": secs,
                    "cells_per_s": world * args.batch * timed / secs,
                    "step_ms": 1e3 * secs / timed,
                    "phase_ms": {
                        "forward": 1e3 * phases[0] / timed,
                        "backward_allreduce": 1e3 * phases[1] / timed,
                        "clip_adamw": 1e3 * phases[2] / timed,
                    },
                    "allreduce_ms_standalone": 1e3 * ar.item(),
                    "padded_len": {
                        "mean": float(np.mean(lengths[args.warmup :])),
                        "min": int(np.min(lengths)),
                        "max": int(np.max(lengths)),
                    },
                    "rows": 2 * args.batch,
                    "length_groups": args.length_groups if tuned else 1,
                    "grouped_steps": grouped_steps,
                    "group_check": group_check,
                }
            ),
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
