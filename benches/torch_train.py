"""PyTorch-eager side of `scfm-worker bench`: the same model (tests/python/scfm_ref.py),
weights, batch and threads as the Rust side; times training steps (zero_grad, forward,
losses, backward, clip_grad_norm_, AdamW) and prints {"steps_per_s": ...} as JSON.

Run by `scfm-worker bench`, which writes model.safetensors, io.safetensors and
config.json into --dir and interleaves rounds with its own.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from scfm_ref import ScfmRef, adamw_param_groups  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = json.load(open(os.path.join(args.dir, "config.json")))
    model = ScfmRef.from_config(cfg["model"], cfg["n_genes"])
    model.load_state_dict(load_file(os.path.join(args.dir, "model.safetensors")), strict=True)
    io = load_file(os.path.join(args.dir, "io.safetensors"))
    batch = {
        "genes": io["genes"].long(),
        "bins": io["bins"].long(),
        "values": io["values"],
        "masked": io["masked"].bool(),
        "target_bins": io["target_bins"].long(),
        "target_values": io["target_values"],
    }
    model.train()
    opt = torch.optim.AdamW(adamw_param_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    params = [p for p in model.parameters()]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        losses = model.losses(batch)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return losses["total"].item() + losses["mgem"].item() + losses["contrastive"].item()

    for _ in range(args.warmup):
        step()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = time.perf_counter() - t
    print(json.dumps({"steps_per_s": args.steps / dt, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
