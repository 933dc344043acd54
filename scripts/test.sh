#!/usr/bin/env bash
# Everything CI runs: setup (idempotent), formatting and lints, the Rust tests (unit and
# multi-process integration, release profile so libtorch's wrapper builds once), and the
# Python cross-checks against PyTorch / anndata / scanpy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
t0=$(date +%s)
cargo fmt --all -- --check
cargo build --release --workspace --all-targets
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace
SCFM_WORKER_BIN="$PWD/target/release/scfm-worker" .venv/bin/python -m pytest tests/python -q
echo "[test] all tests passed in $(( $(date +%s) - t0 )) s"
