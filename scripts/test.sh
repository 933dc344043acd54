#!/usr/bin/env bash
# Everything CI runs: setup (idempotent), formatting and lints, the Rust tests (unit and
# multi-process integration against real processes and a real S3 server, release profile
# so libtorch's wrapper builds once), and the
# Python cross-checks against PyTorch / anndata / scanpy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A real S3-compatible server for the object-storage tests (tests/storage.rs starts it).
S3S_VERSION=0.14.1
if ! .cache/s3s/bin/s3s-fs --version 2>/dev/null | grep -q "$S3S_VERSION"; then
    echo "[test] installing s3s-fs $S3S_VERSION (S3 test server) into .cache/s3s"
    cargo install s3s-fs --version "$S3S_VERSION" --features binary --locked --root .cache/s3s
fi
t0=$(date +%s)
cargo fmt --all -- --check
cargo build --release --workspace --all-targets
cargo clippy --release --workspace --all-targets -- -D warnings
# The NCCL path (feature `nccl`) cannot run without a GPU, but it must keep compiling.
cargo clippy --release -p scfm-worker --features nccl --all-targets -- -D warnings
cargo test --release --workspace
# The NCCL loader and backend choice as built with `nccl`: the torch wheel's real
# libnccl.so.2 is found next to torch and loads (no GPU needed), CUDA's absence is named.
cargo test --release -p scfm-worker --features nccl --lib -- collective:: libtorch::
# SCFM_TEST_CONTAINER=1: also build the local CPU image (deploy/container) and run
# `scfm presets` inside it (~1 min; installs mmdebstrap, podman, runc, patchelf).
SCFM_TEST_CONTAINER=1 SCFM_WORKER_BIN="$PWD/target/release/scfm-worker" .venv/bin/python -m pytest tests/python -q
# SCFM_TEST_GPU_BUNDLE=1 (CI sets it): build the GPU bundle (release binaries with static
# HDF5 and --features nccl) and dry-run it on CPU from a copy outside the checkout.
if [ "${SCFM_TEST_GPU_BUNDLE:-0}" = 1 ]; then
    bash scripts/gpu-bundle.sh
else
    echo "[test] the GPU bundle's build and CPU dry run are off (SCFM_TEST_GPU_BUNDLE=1 runs them)"
fi
echo "[test] all tests passed in $(( $(date +%s) - t0 )) s"
