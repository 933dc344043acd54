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
cargo build --release -p scfm-worker --features cuda
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
echo "gpu-check: NCCL all-reduce is not implemented yet; multi-GPU jobs all-reduce over the CPU ring."
rm -rf "$dir"
