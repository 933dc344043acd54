"""PyTorch side of `scfm-worker bench-embed`: `scfm_torch.embed` on the same cells, with
the same weights and intra-op threads as the Rust side.

Started once per preset by `scfm-worker bench-embed`, which writes the model's export
folder (--model). Loads the model (`scfm_torch.load`) and the cells (--data, the first
--cells of them, repeated when there are fewer) once, prints a JSON line
{"ready": true, "cells": N, "torch": VERSION, "threads": T}, then serves one command per
stdin line:

    run [PATH]   one untimed warm-up batch, then one timed `scfm_torch.embed` over all
                 cells; prints {"seconds": S, "cells": N}; with PATH, also writes the
                 embeddings there (safetensors, tensor `embeddings`, after the timing)
    warm S       whole passes over all cells for at least S seconds, untimed; prints
                 {"seconds": S', "cells": C}
    for S        one untimed warm-up batch, then whole passes over all cells until at least
                 S seconds have passed; prints {"seconds": S', "cells": C} (C: cells embedded)
    quit         exits (as does the end of stdin)
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import anndata  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import scfm_torch  # noqa: E402


def cells(path: str, n: "int | None") -> anndata.AnnData:
    """The cells of ``path``: all, or the first ``n`` (repeated to reach ``n``)."""
    adata = anndata.read_h5ad(path)
    if n is None:
        return adata
    idx = np.arange(n) % adata.n_obs
    x = sp.csr_matrix(adata.X)[idx]
    return anndata.AnnData(X=x, obs=pd.DataFrame(index=[str(i) for i in range(n)]), var=adata.var)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cells", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = scfm_torch.load(args.model)
    adata = cells(args.data, args.cells)
    warm = adata[: args.batch_size].copy()

    def embed(a: anndata.AnnData) -> np.ndarray:
        with torch.inference_mode():
            return scfm_torch.embed(model, a, batch_size=args.batch_size)

    print(
        json.dumps({"ready": True, "cells": adata.n_obs, "torch": torch.__version__, "threads": torch.get_num_threads()}),
        flush=True,
    )
    for line in sys.stdin:
        cmd, _, path = line.strip().partition(" ")
        if cmd == "quit":
            break
        if cmd in ("warm", "for"):
            if cmd == "for":
                embed(warm)
            seconds, done = float(path), 0
            t = time.perf_counter()
            while True:
                embed(adata)
                done += adata.n_obs
                dt = time.perf_counter() - t
                if dt >= seconds:
                    break
            print(json.dumps({"seconds": dt, "cells": done}), flush=True)
            continue
        if cmd != "run":
            raise SystemExit(f"torch_embed.py: unknown command {line.strip()!r}")
        embed(warm)
        t = time.perf_counter()
        out = embed(adata)
        dt = time.perf_counter() - t
        if path:
            save_file({"embeddings": torch.from_numpy(np.ascontiguousarray(out))}, path)
        print(json.dumps({"seconds": dt, "cells": adata.n_obs}), flush=True)


if __name__ == "__main__":
    main()
