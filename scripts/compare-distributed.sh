#!/usr/bin/env bash
# Data-parallel training speed on one machine, side by side: the crate (examples/bench.rs,
# `--features distributed`, under `mpirun -np 2`) and PyTorch's DistributedDataParallel
# (gloo, `torchrun --nproc_per_node 2`), each as 2 ranks x 1 thread and as 1 process x 2
# threads, on the article's ResNet (full and shrunken), training at one global batch; and
# 1 process x 1 thread at one rank's share of the batch (a rank's compute alone, to see how
# much of the communication a 2-rank step leaves exposed).
# Rounds alternate the frameworks so that drifts in machine load hit both alike. Prints every
# measurement as a JSON line, then a table of medians with the 2-rank / 1-process ratios and
# the communication time per step (the crate's, measured inside its steps; PyTorch's, one
# all-reduce of every gradient timed on its own, since DDP hides it inside the backward pass).
#
#   TORCH_PY=/path/to/venv/bin/python scripts/compare-distributed.sh [ROUNDS]
#
# Environment: TORCH_PY (an interpreter with torch; torchrun is run as `TORCH_PY -m
# torch.distributed.run`), BATCH (global batch, default 64), STEPS (default 3), WARMUP
# (default 1), NETS (default "full small"), OUT (default runs/compare-distributed).
# Needs Open MPI (Debian: openmpi-bin libopenmpi-dev libclang-dev). Measure on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
BATCH=${BATCH:-64}
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-1}
NETS=${NETS:-"full small"}
OUT=${OUT:-runs/compare-distributed}
TORCH_PY=${TORCH_PY:-python3}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

cargo build --release --features distributed --example bench >&2
have_torch=1; "$TORCH_PY" -c 'import torch' 2>/dev/null || { have_torch=0; echo "PyTorch not found in $TORCH_PY: skipped" >&2; }
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
echo "cpu: $cpu; flags: $(grep -o -w -E 'avx2|fma|avx512f|avx512bw|avx512_vnni|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')" >&2

# Appends the command's JSON line (its last line starting with '{') with the setup.
measure() {
  local setup=$1 net=$2; shift 2
  local line
  line=$("$@" 2>"$OUT/last.err" | grep '^{' | tail -1) || { cat "$OUT/last.err" >&2; exit 1; }
  python3 - "$line" "$setup" "$net" "$cpu" >>"$RESULTS" <<'PY'
import json, sys
d = json.loads(sys.argv[1]); d.update(setup=sys.argv[2], net=sys.argv[3], cpu=sys.argv[4])
print(json.dumps(d))
PY
  tail -1 "$RESULTS" >&2
}

for round in $(seq "$ROUNDS"); do
  for net in $NETS; do
    if [ "$net" = small ]; then model=(--stages 1,1,1,1 --width-divisor 4); else model=(); fi
    common=(--model resnet --mode train --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" "${model[@]}")
    half=(--model resnet --mode train --batch-size $((BATCH / 2)) --steps "$STEPS" --warmup "$WARMUP" "${model[@]}")
    measure "1x2" "$net" env RAYON_NUM_THREADS=2 ./target/release/examples/bench "${common[@]}"
    measure "1x1-half" "$net" env RAYON_NUM_THREADS=1 ./target/release/examples/bench "${half[@]}"
    measure "2x1" "$net" mpirun -np 2 --oversubscribe --bind-to none -x RAYON_NUM_THREADS=1 \
      ./target/release/examples/bench "${common[@]}"
    if [ $have_torch = 1 ]; then
      measure "1x2" "$net" "$TORCH_PY" scripts/torch_reference.py bench "${common[@]}" --threads 2
      measure "1x1-half" "$net" "$TORCH_PY" scripts/torch_reference.py bench "${half[@]}" --threads 1
      measure "2x1" "$net" "$TORCH_PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
        scripts/torch_reference.py bench "${common[@]}" --threads 1
    fi
  done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    d = json.loads(line)
    runs[(d["framework"], d["net"], d["setup"])].append(d)
def med(rows, key):
    return statistics.median(r.get(key, 0.0) for r in rows)
# comm: the crate's time in collective calls per step (measured inside its steps); PyTorch's
# one all-reduce of every gradient timed on its own. exposed: a 2-rank step's time beyond one
# rank's compute alone (1 process x 1 thread at half the batch). hidden: 1 - exposed / comm.
print("| framework | net | 1x2 img/s | 2x1 img/s | 2x1 / 1x2 | step ms 2x1 | step ms 1x1 half | comm ms | exposed ms | hidden |")
print("|---|---|---|---|---|---|---|---|---|---|")
for fw in ["candle-functional", "pytorch"]:
    for net in ["full", "small"]:
        one, two, half = (runs.get((fw, net, k)) for k in ("1x2", "2x1", "1x1-half"))
        if not one or not two or not half:
            continue
        comm = med(two, "comm_ms_median") if fw == "candle-functional" else med(two, "allreduce_ms_standalone")
        exposed = med(two, "median_ms") - med(half, "median_ms")
        hidden = min(1.0, max(0.0, 1 - exposed / comm)) if comm > 0 else float("nan")
        print(f"| {fw} | {net} | {med(one, 'images_per_sec'):.1f} | {med(two, 'images_per_sec'):.1f} | "
              f"{med(two, 'images_per_sec') / med(one, 'images_per_sec'):.2f} | {med(two, 'median_ms'):.0f} | "
              f"{med(half, 'median_ms'):.0f} | {comm:.1f} | {exposed:.0f} | {hidden:.0%} |")
PY
