#!/usr/bin/env bash
# The main job on a fresh machine: set up (idempotent), build, and run a local cluster —
# the coordinator plus 2 worker processes on 127.0.0.1 — training the `minimal` model on
# 10,000 real mouse cells (raw 10x counts shipped in scanpy's sources, prepared into
# shards by `scfm prepare`), checkpoints on
# local disk under runs/demo-local. Running it again resumes from the latest checkpoint
# (delete runs/demo-local to start over). Extra arguments go to `scfm local`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p scfm-worker -p scfm-coordinator
# The prepared (sharded) dataset the job trains on; deterministic, so re-running it
# rewrites identical shards.
./target/release/scfm prepare data/mouse10k.h5ad --out data/mouse10k-prepared \
    --settings configs/prepare-demo.yaml
exec ./target/release/scfm local configs/job-local.yaml --workers 2 "$@"
