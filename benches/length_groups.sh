#!/usr/bin/env bash
# Training-step time with the encoder's length groups off (training.length_groups: 1) and on
# (4), side by side on one data set: `minimal`, one thread, batch 32, seed 0. Each round
# trains both (order reversed every other round, each run warm by its own first 10 steps)
# and times the steps after step 10 from the worker's log lines; prints every round, the
# medians with min-max and spread, the ratio, and the load average before and after.
#
#   cargo build --release --workspace
#   bash benches/length_groups.sh DATA [STEPS] [ROUNDS]
#
# DATA: a prepared dataset or any input `scfm-worker train` reads (data.path). STEPS
# (default 110) should make a round last 10 s or more; ROUNDS defaults to 5.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash benches/length_groups.sh DATA [STEPS] [ROUNDS]}
steps=${2:-110}
rounds=${3:-5}
worker=target/release/scfm-worker
[[ -x $worker ]] || { echo "$worker is missing: cargo build --release --workspace" >&2; exit 1; }
[[ -e $data ]] || { echo "no data at $data" >&2; exit 1; }
((steps > 10)) || { echo "STEPS must be above 10 (the first 10 are untimed)" >&2; exit 1; }
data=$(realpath "$data")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for g in 1 4; do
  cat >"$tmp/t$g.yaml" <<EOF
data:
  path: $data
model:
  preset: minimal
training:
  seed: 0
  batch_size: 32
  epochs: 1000
  max_steps: $steps
  warmup_steps: 10
  eval_every: 1000000
  max_eval_cells: 64
  log_every: 10
  threads: 1
  length_groups: $g
checkpoint:
  url: $tmp/ckpt$g
  every_steps: 1000000
  keep_last: 1
EOF
done
# Seconds between the `train step=10` and `train step=STEPS` log lines of a log.
span() {
  python3 - "$1" "$steps" <<'EOF'
import sys
from datetime import datetime
log, steps = open(sys.argv[1]).read().splitlines(), sys.argv[2]
def at(n):
    line = next(l for l in log if f"train step={n} " in l)
    return datetime.strptime(line.split()[0].rstrip("Z")[:26], "%Y-%m-%dT%H:%M:%S.%f")
print((at(steps) - at(10)).total_seconds())
EOF
}
echo "length groups 1 vs 4: $data, $steps steps ($((steps - 10)) timed), $rounds rounds; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A ms
for r in $(seq 1 "$rounds"); do
  order="1 4"
  ((r % 2 == 0)) && order="4 1"
  for g in $order; do
    RUST_LOG=info "$worker" train --config "$tmp/t$g.yaml" --fresh >"$tmp/log" 2>&1 ||
      { tail -5 "$tmp/log" >&2; exit 1; }
    s=$(span "$tmp/log")
    m=$(python3 -c "print(f'{1000 * $s / ($steps - 10):.1f}')")
    ms[$g]="${ms[$g]:-} $m"
    echo "round $r: length_groups $g: $m ms/step (${s} s)"
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "${ms[1]}" "${ms[4]}" <<'EOF'
import statistics, sys
whole, grouped = ([float(x) for x in a.split()] for a in sys.argv[1:3])
for name, v in (("length_groups 1", whole), ("length_groups 4", grouped)):
    m = statistics.median(v)
    print(f"{name}: {' '.join(f'{x:.1f}' for x in v)} ms/step; median {m:.1f} "
          f"({min(v):.1f}-{max(v):.1f}), spread {100 * (max(v) - min(v)) / m:.0f}%")
print(f"speed-up of the medians: {statistics.median(whole) / statistics.median(grouped):.2f}x")
EOF
