"""PyTorch side of `scfm-worker bench`: the same model (python/scfm_torch, an independent
PyTorch implementation), weights, batch and threads as the Rust side, as a persistent
process so that both sides are measured warm.

Baselines (``--variant``):

- ``plain``: the package's model as written (``ScfmModel.losses``: every token through
  every layer and the MGEM head) with ``torch.optim.AdamW``'s defaults (on the CPU that is
  the per-tensor loop: neither ``foreach`` nor ``fused`` is the CPU default).
- ``tuned``: PyTorch written as well as scfm: with ``cls`` pooling the last encoder block
  runs only for ``[CLS]`` and the masked tokens (keys and values from every token, as
  scfm's ``forward_train``), the MGEM head only on the masked tokens (as scfm's), SDPA
  attention, and ``AdamW(fused=True)``; given groups (``scfm_torch.groups``), the encoder
  runs rows of similar length together, each group padded to its own longest row, as scfm's
  does (this bench's sequences are all full, so neither side groups them; the scaling
  bench's DDP side does).
- ``compiled``: ``tuned`` with the loss function under ``torch.compile`` (inductor).

Before serving, ``tuned`` and ``compiled`` check that their losses equal ``plain``'s on
the batch (dropout off) and report the relative difference.

Protocol (one command per line on stdin, one JSON line per answer on stdout):
``warm S`` runs training steps for at least S seconds untimed; ``round S`` runs steps
until at least S seconds have passed and answers ``{"steps": n, "seconds": t}``;
``quit`` ends. The first line written is ``{"ready": ..., "check": ...}``.

Run by `scfm-worker bench`, which writes model.safetensors, io.safetensors and
config.json into --dir.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from scfm_ref import PAD, ScfmRef, adamw_param_groups, detected_covariate, gepc_mse, nt_xent  # noqa: E402


def last_block_queries(block, x, attend, idx):
    """The pre-LN block for the query rows ``idx`` ``[N, Q]`` only: keys and values from
    every token of ``x`` ``[N, L, H]``."""
    n, length, h = x.shape
    heads = block.attn.n_heads
    hd = h // heads
    q_rows = idx.shape[1]
    y = block.norm1(x)
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    gather = idx.unsqueeze(-1).expand(n, q_rows, h)
    yq = torch.gather(y, 1, gather)
    q = F.linear(yq, w[:h], b[:h]).view(n, q_rows, heads, hd).transpose(1, 2)
    kv = F.linear(y, w[h:], b[h:]).view(n, length, 2, heads, hd).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attend, dropout_p=0.0, is_causal=False)
    a = block.attn.out(a.transpose(1, 2).reshape(n, q_rows, h))
    xq = torch.gather(x, 1, gather) + F.dropout(a, block.dropout, block.training)
    return xq + F.dropout(block.ffn(block.norm2(xq)), block.dropout, block.training)


def encode_rows(model, genes, bins, values, masked, idx, sel):
    """The encoder over these rows, computing only what the losses use: the cell
    embeddings ``[N, H]`` and the last layer's outputs at the masked tokens (row-major)."""
    cfg = model.cfg
    attend = (genes != PAD)[:, None, None, :]
    x = model.embed(genes, bins, values, masked)
    layers = model.encoder.layers
    if cfg.pooling == "cls":
        for layer in layers[:-1]:
            x = layer(x, attend)
        y = model.encoder.norm(last_block_queries(layers[-1], x, attend, idx))
        return y[:, 0], y[:, 1:][sel]
    for layer in layers:
        x = layer(x, attend)
    y = model.encoder.norm(x)
    genes_only = (genes != PAD)[:, 1:].unsqueeze(-1).to(y.dtype)
    cell = (y[:, 1:] * genes_only).sum(1) / genes_only.sum(1).clamp_min(1.0)
    return cell, y[masked]


def group_index(batch, groups):
    """Per group: its rows, padded length and query index; and the index that puts rows
    in group order back in the batch's order (for ``tuned_losses``)."""
    parts = []
    for rows, length in groups:
        rows_t = torch.tensor(rows, dtype=torch.long)
        idx, sel = query_index(batch["masked"][rows_t, :length])
        parts.append((rows_t, length, idx, sel))
    flat = torch.cat([p[0] for p in parts])
    restore = torch.empty_like(flat)
    restore[flat] = torch.arange(len(flat))
    return parts, restore


def tuned_losses(model, batch, idx, sel, grouped=None):
    """``ScfmModel.losses`` computing only what the losses use; with ``grouped`` (from
    ``group_index``) the encoder runs each group of similar-length rows padded to its own
    longest row, and the heads run on the reassembled batch."""
    cfg = model.cfg
    genes, masked = batch["genes"], batch["masked"]
    if grouped is None:
        cell, hm = encode_rows(model, genes, batch["bins"], batch["values"], masked, idx, sel)
        tb, tv = batch["target_bins"][masked], batch["target_values"][masked]
    else:
        parts, restore = grouped
        cells, hms, tbs, tvs = [], [], [], []
        for rows, length, gi, gs in parts:
            def pick(t):
                return t[rows, :length]

            c, h = encode_rows(model, pick(genes), pick(batch["bins"]), pick(batch["values"]), pick(masked), gi, gs)
            cells.append(c)
            hms.append(h)
            tbs.append(pick(batch["target_bins"])[pick(masked)])
            tvs.append(pick(batch["target_values"])[pick(masked)])
        cell, hm = torch.cat(cells)[restore], torch.cat(hms)
        tb, tv = torch.cat(tbs), torch.cat(tvs)
    out = model.mgem(hm)
    if cfg.expression == "binned":
        mgem = F.cross_entropy(out, tb, label_smoothing=cfg.label_smoothing)
    else:
        mgem = F.mse_loss(out.squeeze(-1), tv)
    con = nt_xent(model.contrastive(cell), cfg.temperature)
    res = {"mgem": mgem, "contrastive": con}
    total = mgem * cfg.w_mgem + con * cfg.w_contrastive
    if model.gepc is not None and "profile" in batch:
        detected = batch.get("detected")
        if detected is None and cfg.gepc_detected and cfg.gepc_target == "log1p":
            detected = detected_covariate(batch["profile"])
        res["gepc"] = gepc_mse(model.gepc_forward(cell, detected), batch["profile"])
        total = total + res["gepc"] * cfg.w_gepc
    res["total"] = total
    return res


def query_index(masked):
    """``[N, Q]`` rows: 0 (``[CLS]``) then each row's masked positions, padded with 0, and
    which of the ``Q - 1`` masked slots are real ``[N, Q - 1]``."""
    counts = masked.sum(1)
    q = int(counts.max()) + 1
    idx = torch.zeros(masked.shape[0], q, dtype=torch.long)
    sel = torch.zeros(masked.shape[0], q - 1, dtype=torch.bool)
    for r in range(masked.shape[0]):
        pos = masked[r].nonzero().squeeze(-1)
        idx[r, 1 : 1 + len(pos)] = pos
        sel[r, : len(pos)] = True
    return idx, sel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=["plain", "tuned", "compiled"], default="plain")
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
    idx, sel = query_index(batch["masked"])
    params = list(model.parameters())
    groups = adamw_param_groups(model, 0.01)
    check = None
    if args.variant == "plain":
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)

        def losses():
            return model.losses(batch)

    else:
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, fused=True)
        fn = tuned_losses
        if args.variant == "compiled":
            fn = torch.compile(tuned_losses)

        def losses():
            return fn(model, batch, idx, sel)

        model.eval()
        with torch.no_grad():
            ref = model.losses(batch)["total"].item()
            got = tuned_losses(model, batch, idx, sel)["total"].item()
        check = abs(got - ref) / max(abs(ref), 1e-12)
        if check > 1e-4:
            raise SystemExit(f"the {args.variant} losses differ from the plain model's: {got} vs {ref}")
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = losses()
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return out["total"].item() + out["mgem"].item() + out["contrastive"].item()

    def run_for(seconds: float) -> tuple[int, float]:
        t = time.perf_counter()
        n = 0
        while True:
            step()
            n += 1
            dt = time.perf_counter() - t
            if dt >= seconds:
                return n, dt

    print(json.dumps({"ready": True, "variant": args.variant, "check": check, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "warm":
            n, dt = run_for(float(cmd[1]))
            print(json.dumps({"warm_steps": n, "seconds": dt}), flush=True)
        elif cmd[0] == "round":
            n, dt = run_for(float(cmd[1]))
            print(json.dumps({"steps": n, "seconds": dt}), flush=True)
        else:
            raise SystemExit(f"unknown command {line!r}")


if __name__ == "__main__":
    main()
