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
# Every test that cannot run here says so in this log (tests/lib.rs `skip`,
# tests/python/conftest.py); the summary at the end counts and lists them, and a check
# named in SCFM_MUST_RUN (space-separated; .ci/run sets it) that skipped fails the run.
export SCFM_SKIP_LOG="$PWD/target/skipped.log"
mkdir -p target && : > "$SCFM_SKIP_LOG"
skip_summary() {
    local n
    n=$(wc -l < "$SCFM_SKIP_LOG")
    if [ "$n" -eq 0 ]; then
        echo "[test] skipped: none"
    else
        echo "[test] skipped: $n"
        sed 's/^/[test]   /' "$SCFM_SKIP_LOG"
    fi
}
trap skip_summary EXIT
cargo fmt --all -- --check
cargo build --release --workspace --all-targets
cargo clippy --release --workspace --all-targets -- -D warnings
# The NCCL path (feature `nccl`) cannot run without a GPU, but it must keep compiling.
cargo clippy --release -p scfm-worker --features nccl --all-targets -- -D warnings
# Reduced object-store backends (features s3, gcs, azure; all on by default) must keep
# compiling too: none at all, and S3 only.
cargo clippy --release -p scfm-common --no-default-features --all-targets -- -D warnings
cargo clippy --release -p scfm-coordinator --no-default-features --features s3 --all-targets -- -D warnings
# Includes the many-hosts tests (tests/netns*.rs: each process in a network namespace of
# its own; as root, else they skip as `netns`; latency needs TUN devices, else `delay-line`
# skips).
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
    printf 'gpu-bundle\toff: SCFM_TEST_GPU_BUNDLE=1 builds the GPU bundle and dry-runs it on CPU\n' >> "$SCFM_SKIP_LOG"
fi
for must in ${SCFM_MUST_RUN:-}; do
    if cut -f1 "$SCFM_SKIP_LOG" | grep -qx "$must"; then
        echo "[test] FAILED: '$must' must run on this machine (SCFM_MUST_RUN) but skipped"
        exit 1
    fi
done
echo "[test] all tests passed in $(( $(date +%s) - t0 )) s"
