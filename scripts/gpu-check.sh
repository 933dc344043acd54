#!/usr/bin/env bash
# Short GPU check: is there an NVIDIA GPU, does libtorch see it from scfm, and does a CUDA
# training step run (bf16 encoder, fp32 master weights)? Without a GPU it says so and
# exits 0. Prints what it measured; record it in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU on this machine; nothing to check."
  exit 0
fi
nvidia-smi -L
bash scripts/setup.sh
cargo build --release -p scfm-worker --features nccl
cargo build --release -p scfm-coordinator
dir=$(mktemp -d)
cat > "$dir/train.yaml" <<YAML
data: {path: $PWD/data/mouse10k.h5ad}
model: {preset: default}
training: {batch_size: 32, max_steps: 30, device: cuda, eval_every: 1000, log_every: 10}
checkpoint: {url: $dir/ckpt, every_steps: 1000}
YAML
./target/release/scfm-worker train --config "$dir/train.yaml" --json > "$dir/out.jsonl"
grep '"event":"done"' "$dir/out.jsonl"
tail -n 3 "$dir/out.jsonl" | head -n 2
./target/release/scfm-worker versions
# Two worker processes (`scfm local` gives both CUDA device 0). With one GPU they share it,
# which NCCL refuses: `cluster.collective: auto` then takes the CPU ring and says so in its
# `collective backend:` lines (`nccl` would fail the job with that reason). NCCL itself
# needs one GPU per worker: `scfm launch` plus `scfm-worker join` with distinct
# CUDA_VISIBLE_DEVICES.
./target/release/scfm prepare data/mouse10k.h5ad --out "$dir/prepared" \
  --settings configs/prepare-demo.yaml >/dev/null
cat > "$dir/job.yaml" <<YAML
run_id: gpu-check
data: {path: $dir/prepared}
model: {preset: minimal}
training: {batch_size: 32, max_steps: 40, eval_every: 1000, log_every: 10}
cluster: {max_workers: 2, device: cuda}
checkpoint: {url: $dir/ckpt-2w, every_steps: 1000}
YAML
if ./target/release/scfm local "$dir/job.yaml" --workers 2 2> "$dir/local.log"; then
  grep -o -E "(NCCL usable here|NCCL not usable here|collective backend|NCCL communicator formed).*" \
    "$dir/local.log" | head -n 6
  ./target/release/scfm metrics "$dir/ckpt-2w" > "$dir/metrics.jsonl"
  python3 - "$dir/metrics.jsonl" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if '"step"' in l]
steps = [s for s in steps if s.get("event") == "step"]
ar = sorted(s["allreduce_s"] for s in steps)
print(f"gpu-check: 2 workers, {len(steps)} step reports, all-reduce median {ar[len(ar)//2]*1e3:.2f} ms, last mgem {steps[-1]['mgem']:.4f}")
PY
else
  echo "gpu-check: the 2-worker job failed:"; tail -n 20 "$dir/local.log"
fi
rm -rf "$dir"
