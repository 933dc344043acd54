#!/usr/bin/env bash
# Builds the GPU bundle here (on CPU) and dry-runs it.
#
# .gpu-bundle/ (git-ignored, under 64 MiB) holds what a GPU machine without Rust needs:
#   bin/scfm, bin/scfm-worker  release builds, stripped, HDF5 linked statically
#                              (built from source: cargo feature `hdf5-static`, cmake >= 3.26),
#                              scfm-worker with `--features nccl`; no rpath: they load the
#                              machine's torch 2.11.0 libraries through LD_LIBRARY_PATH
#   data/mouse10k-prepared     the demo dataset, prepared by the bundle's own `scfm prepare`
#   gpu-run.sh, gpu_run.py     the check to run there (scripts/gpu-bundle/)
#   bundle.json                commit, build settings, the glibc and libstdc++ versions the
#                              binaries need, sizes
# Then it copies the bundle to a temporary folder and runs gpu-run.sh from there, against
# this checkout's torch wheel (.venv, the same torch 2.11.0), with nothing of target/ on
# any path: the CUDA parts report "skipped: no GPU", the rest (ldd and versions, a CPU
# training step, 2 workers on the ring with one SIGKILLed) must pass.
#
# Usage: bash scripts/gpu-bundle.sh [--no-dry-run]
# On the GPU machine (see docs/hardware.md#running-the-gpu-bundle): bash .gpu-bundle/gpu-run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
log() { printf '[gpu-bundle] %s\n' "$*" >&2; }
dry_run=1
orig_path=$PATH
[ "${1:-}" = "--no-dry-run" ] && dry_run=0
t0=$(date +%s)
# The binaries must run where glibc is this old (the GPU machines' is not known here).
GLIBC_MAX=2.34
BUNDLE=.gpu-bundle
LIMIT_BYTES=$((64 * 1024 * 1024))

[ -f .cargo/config.toml ] || bash scripts/setup.sh
torch_version=$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
want=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' scripts/requirements.txt)
case "$torch_version" in
  "$want"|"$want"+*) ;;
  *)
    log "SKIPPED: .venv has torch '${torch_version:-none}', not $want (scripts/requirements.txt):"
    log "SKIPPED: the bundle is built and dry-run against the torch the GPU machine has; run scripts/setup.sh"
    if [ -n "${SCFM_SKIP_LOG:-}" ]; then
        printf 'gpu-bundle\t.venv has torch %s, not %s\n' "${torch_version:-none}" "$want" >> "$SCFM_SKIP_LOG"
    fi
    exit 0 ;;
esac

# cmake >= 3.26 for HDF5 2.x (Debian 12 has 3.25): from PyPI into target/gpu-bundle/tools.
tools=$ROOT/target/gpu-bundle/tools
cmake_ok() {
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^cmake version \([0-9]*\.[0-9]*\).*/\1/p')
  [ -n "$v" ] && [ "$(printf '%s\n3.26\n' "$v" | sort -V | head -n1)" = 3.26 ]
}
if cmake_ok cmake; then
  log "cmake: $(command -v cmake)"
elif cmake_ok "$tools/bin/cmake"; then
  export PATH="$tools/bin:$PATH"
else
  log "installing cmake 3.31.6 from PyPI into $tools (HDF5 2.x needs cmake >= 3.26)"
  .venv/bin/python -m venv "$tools"
  "$tools/bin/pip" install -q 'cmake==3.31.6'
  export PATH="$tools/bin:$PATH"
fi

features=scfm-worker/nccl,scfm-worker/hdf5-static,scfm-coordinator/hdf5-static
log "building scfm and scfm-worker (--release, features $features)"
b0=$(date +%s)
cargo build --release -p scfm-worker -p scfm-coordinator --features "$features"
build_s=$(( $(date +%s) - b0 ))
log "built in ${build_s} s"

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/bin" "$BUNDLE/data"
for b in scfm scfm-worker; do
  cp "target/release/$b" "$BUNDLE/bin/$b"
  strip "$BUNDLE/bin/$b"
  # The rpath of .cargo/config.toml points into this checkout's .venv: the bundle finds
  # torch through LD_LIBRARY_PATH instead.
  patchelf --remove-rpath "$BUNDLE/bin/$b"
done

# What the binaries need from the machine.
needed=$(for b in "$BUNDLE"/bin/*; do readelf -d "$b" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; done | sort -u)
if echo "$needed" | grep -q hdf5; then
  log "FAILED: the bundle's binaries link a shared libhdf5: $needed"; exit 1
fi
if readelf -d "$BUNDLE"/bin/* | grep -q -E 'R(UN)?PATH'; then
  log "FAILED: an rpath is left in the bundle's binaries"; exit 1
fi
sym_max() { objdump -T "$BUNDLE"/bin/* | grep -o "$1"'_[0-9.]*' | sed "s/$1_//" | sort -V | tail -n1; }
glibc=$(sym_max GLIBC)
glibcxx=$(sym_max GLIBCXX)
if [ "$(printf '%s\n%s\n' "$glibc" "$GLIBC_MAX" | sort -V | tail -n1)" != "$GLIBC_MAX" ]; then
  log "FAILED: the binaries need glibc $glibc, more than $GLIBC_MAX"; exit 1
fi
log "binaries need glibc >= $glibc, libstdc++ GLIBCXX >= $glibcxx; shared libraries: $(echo $needed)"

# The tiny dataset, prepared by the bundle's own scfm (HDF5 2.x writes the shards).
"$BUNDLE/bin/scfm" prepare data/mouse10k.h5ad --out "$BUNDLE/data/mouse10k-prepared" \
  --settings configs/prepare-demo.yaml >/dev/null
cp scripts/gpu-bundle/gpu-run.sh scripts/gpu-bundle/gpu_run.py "$BUNDLE/"
chmod +x "$BUNDLE/gpu-run.sh"

bytes=$(du -sb "$BUNDLE" | cut -f1)
ROOT="$ROOT" BUNDLE="$BUNDLE" TORCH="$torch_version" GLIBC="$glibc" GLIBCXX="$glibcxx" \
  NEEDED="$needed" BYTES="$bytes" BUILD_S="$build_s" FEATURES="$features" \
  .venv/bin/python - <<'PY'
import json, os, subprocess
from pathlib import Path
b = Path(os.environ["BUNDLE"])
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
json.dump({
    "commit": git("rev-parse", "HEAD"),
    "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "built": subprocess.run(["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"], capture_output=True, text=True).stdout.strip(),
    "features": os.environ["FEATURES"],
    "torch": os.environ["TORCH"],
    "needs_glibc": os.environ["GLIBC"],
    "needs_glibcxx": os.environ["GLIBCXX"],
    "needed_libraries": os.environ["NEEDED"].split(),
    "bytes": int(os.environ["BYTES"]),
    "files": {str(p.relative_to(b)): p.stat().st_size for p in sorted(b.rglob("*")) if p.is_file()},
    "build_seconds": int(os.environ["BUILD_S"]),
}, open(b / "bundle.json", "w"), indent=1)
PY
if [ "$bytes" -ge "$LIMIT_BYTES" ]; then
  log "FAILED: $BUNDLE is $bytes bytes, over the 64 MiB a device call carries"; exit 1
fi
log "$BUNDLE: $(( bytes / 1024 / 1024 )) MiB ($bytes bytes)"

if [ "$dry_run" = 0 ]; then
  log "done in $(( $(date +%s) - t0 )) s (no dry run)"
  exit 0
fi

# Dry run: the bundle copied elsewhere, run with this checkout's torch wheel only.
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp -a "$BUNDLE" "$dir/bundle"
log "dry run of a copy in $dir/bundle (CUDA parts skip without a GPU)"
set +e
env -u LD_LIBRARY_PATH -u LIBTORCH -u SCFM_WORKER_BIN PATH="$orig_path" OUT="$dir/out" \
  SCFM_GPU_PYTHON="$ROOT/.venv/bin/python" \
  bash "$dir/bundle/gpu-run.sh"
rc=$?
set -e
mkdir -p target/gpu-bundle
cp "$dir/out/summary.json" target/gpu-bundle/dry-run-summary.json
cp "$dir/out/parts.log" target/gpu-bundle/dry-run-parts.log
.venv/bin/python - "$dir/out/summary.json" "$rc" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
parts = s["parts"]
gpu = bool(s["machine"].get("gpus"))
# Without a GPU these must skip (saying so) and everything else must pass; with one, all pass.
cuda_parts = {"nccl-check", "cuda-step-default", "cuda-step-large"}
bad = []
for name, r in parts.items():
    print(f"[gpu-bundle] dry run: {name:18} {r['status']:8} {r.get('reason', '')}")
    if name in cuda_parts and not gpu:
        if r["status"] != "skipped" or not r.get("reason", "").startswith("no GPU"):
            bad.append(name)
    elif r["status"] != "ok":
        bad.append(name)
expected = {"environment", "versions", "cpu-step", "two-workers", "worker-kill"} | cuda_parts
if set(parts) != expected:
    bad.append(f"parts {sorted(parts)} != {sorted(expected)}")
fp = parts.get("two-workers", {}).get("fingerprints")
print(f"[gpu-bundle] dry run: 2-worker fingerprints {fp}, after the kill: generations "
      f"{parts.get('worker-kill', {}).get('generations')}, recovered {parts.get('worker-kill', {}).get('recovered')}")
if bad or (int(sys.argv[2]) != 0) != bool([n for n, r in parts.items() if r["status"] == "failed"]):
    sys.exit(f"[gpu-bundle] FAILED: dry run parts {bad} (gpu-run.sh exit {sys.argv[2]}); see target/gpu-bundle/dry-run-parts.log")
PY
log "dry run passed; summary in target/gpu-bundle/dry-run-summary.json; done in $(( $(date +%s) - t0 )) s"
log "on a GPU machine: bash .gpu-bundle/gpu-run.sh (docs/hardware.md#running-the-gpu-bundle)"
