#!/usr/bin/env bash
# Checks that the workspace builds with the oldest Rust it declares (`rust-version` in
# Cargo.toml, the MSRV): installs that toolchain with rustup (minimal profile) and runs
# `cargo check --workspace --all-targets` with it into target/msrv. CI runs it (.ci/run).
# The MSRV is the newest of what the code uses and what the locked dependencies declare.
set -euo pipefail
cd "$(dirname "$0")/.."
msrv=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
[ -n "$msrv" ] || { echo "msrv-check: no rust-version in Cargo.toml" >&2; exit 1; }
bash scripts/setup.sh >/dev/null
rustup toolchain install "$msrv" --profile minimal >/dev/null
echo "[msrv] cargo +$msrv check --workspace --all-targets"
cargo "+$msrv" check --locked --workspace --all-targets --target-dir target/msrv
echo "[msrv] the workspace builds with Rust $msrv"
