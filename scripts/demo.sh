#!/usr/bin/env bash
# The main job on a fresh machine: set up (idempotent), build, and train the `minimal`
# model on 10,000 real mouse cells (raw 10x counts shipped in scanpy's sources), with
# checkpoints on local disk under runs/demo. Extra arguments go to `scfm-worker train`
# (e.g. --resume to continue the previous demo run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p scfm-worker -p scfm-coordinator
exec ./target/release/scfm train --config configs/train-demo.yaml "$@"
