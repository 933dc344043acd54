#!/usr/bin/env bash
# The GPU check of the bundle that scripts/gpu-bundle.sh writes into .gpu-bundle/: run on a
# GPU machine as `bash .gpu-bundle/gpu-run.sh` (needs a torch 2.11.0 wheel there, found
# through its Python). Writes summary.json, gpu-run.log and parts.log into $OUT (default:
# .gpu-bundle/out). Each part is independent and bounded by a timeout; the whole fits in
# about 7 minutes. Parts that need CUDA report "skipped: no GPU" on a machine without one,
# which is how scripts/gpu-bundle.sh dry-runs the bundle on CPU.
#
# Environment: SCFM_GPU_PYTHON (a Python whose `import torch` is torch 2.11.0; default
# /opt/torch/.venv/bin/python3, else python3), SCFM_TORCH_LIB (torch/lib instead of asking
# that Python), SCFM_GPU_RUN_PARTS (comma-separated parts to run; default all).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${SCFM_GPU_PYTHON:-}
if [ -z "$py" ]; then
  for c in /opt/torch/.venv/bin/python3 python3; do
    if command -v "$c" >/dev/null 2>&1; then py=$c; break; fi
  done
fi
if [ -z "$py" ]; then
  echo "gpu-run: no Python found (set SCFM_GPU_PYTHON)" >&2
  exit 2
fi
exec "$py" -u "$here/gpu_run.py" "$@"
