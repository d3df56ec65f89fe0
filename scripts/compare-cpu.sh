#!/usr/bin/env bash
# CPU speed, side by side: the crate's benchmark (examples/bench.rs) and the PyTorch and Keras
# references (scripts/torch_reference.py, scripts/keras_bench.py) on the article's ResNet and
# PlainNet, full-width and shrunken (16-32-64-128 filters, one block a stage: the networks of
# docs/RESULTS.md), training at batch 32 and 128, inference at batch 128 and at batch 1
# (latency). The frameworks run alternately, round after round, so that drifts in machine load
# hit all three alike. Prints every measurement as a JSON line (with peak memory and the load
# average before the run), then a table of medians and the crate/PyTorch and crate/Keras ratios.
#
#   scripts/compare-cpu.sh [ROUNDS]            # default 1 round
#   TORCH_PY=/path/to/venv/bin/python KERAS_PY=/path/to/tf-venv/bin/python scripts/compare-cpu.sh 3
#   BUILDS="default avx2-gemm:--no-default-features,--features=keras" scripts/compare-cpu.sh 2
#                                              # a column per build of the crate
#
# Environment: TORCH_PY / KERAS_PY (interpreters with torch / tensorflow-cpu; a missing one is
# skipped and said so), STEPS (timed steps, default 10), LATENCY_STEPS (timed steps of the
# batch-1 cases, default 50: a step there takes 0.5-25 ms, and with 4 steps their ratios moved
# by up to 0.56 between two rounds), WARMUP (default 2; Keras traces its
# function in the first), THREADS (default 2), MODELS (default "resnet plain"), NETS (default
# "full small"), CASES (default "train 32,train 128,infer 128,infer 1"), OUT (default
# runs/compare-cpu), BUILDS (builds of the crate, each timed as its own framework column:
# `default`; a cargo feature added to the defaults, such as `onednn`; or NAME:FLAGS, cargo
# flags separated by commas; default "default").
# Measure on an idle machine: PyTorch's threads busy-wait and collapse under any other load.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
STEPS=${STEPS:-10}
LATENCY_STEPS=${LATENCY_STEPS:-50}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-2}
MODELS=${MODELS:-"resnet plain"}
NETS=${NETS:-"full small"}
CASES=${CASES:-"train 32,train 128,infer 128,infer 1"}
OUT=${OUT:-runs/compare-cpu}
TORCH_PY=${TORCH_PY:-python3}
KERAS_PY=${KERAS_PY:-python3}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

source scripts/builds.sh
build_each bench "$OUT"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1); $(nproc) cores; flags: $(grep -o -w -E 'avx2|fma|avx512f|avx512bw|avx512vl|avx512_vnni|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')" | tee "$OUT/cpu.txt" >&2
have_torch=1; "$TORCH_PY" -c 'import torch' 2>/dev/null || { have_torch=0; echo "PyTorch not found in $TORCH_PY: skipped" >&2; }
have_keras=1; "$KERAS_PY" -c 'import keras, tensorflow' 2>/dev/null || { have_keras=0; echo "Keras not found in $KERAS_PY: skipped" >&2; }

# Runs one benchmark command; appends its JSON line with peak RSS (MiB) and load average.
measure() {
  local load mem line
  load=$(cut -d' ' -f1 /proc/loadavg)
  line=$( { /usr/bin/time -f 'MAXRSS %M' "$@" 2> "$OUT/stderr.txt"; } | tail -n 1)
  mem=$(awk '/^MAXRSS/ {printf "%.0f", $2 / 1024}' "$OUT/stderr.txt")
  line="${line%\}}, \"peak_rss_mib\": ${mem:-null}, \"load_before\": $load}"
  # A build other than the default is its own framework column.
  if [ -n "${LABEL:-}" ]; then line=${line/\"framework\": \"candle-functional\"/\"framework\": \"$LABEL\"}; fi
  echo "$line" | tee -a "$RESULTS"
}

export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
for round in $(seq "$ROUNDS"); do
  for net in $NETS; do
    case $net in
      full) shape=(--stages 2,5,5,2 --width-divisor 1) ;;
      small) shape=(--stages 1,1,1,1 --width-divisor 4) ;;
      *) echo "NETS: full or small, not $net" >&2; exit 2 ;;
    esac
    for model in $MODELS; do
      IFS=, read -ra cases <<< "$CASES"
      for cfg in "${cases[@]}"; do
        set -- $cfg
        steps=$STEPS
        if [ "$2" = 1 ]; then steps=$LATENCY_STEPS; fi
        common=(--model "$model" --mode "$1" --batch-size "$2" --steps "$steps" --warmup "$WARMUP" "${shape[@]}")
        for name in "${names[@]}"; do
          if [ "$name" = default ]; then measure "$OUT/bench-$name" "${common[@]}" --device cpu
          else LABEL="candle-functional[$name]" measure "$OUT/bench-$name" "${common[@]}" --device cpu; fi
        done
        if [ $have_torch = 1 ]; then measure "$TORCH_PY" scripts/torch_reference.py bench "${common[@]}" --threads "$THREADS"; fi
        if [ $have_keras = 1 ]; then measure "$KERAS_PY" scripts/keras_bench.py bench "${common[@]}" --threads "$THREADS"; fi
      done
    done
  done
done

python3 - "$RESULTS" <<'PY'
import collections, json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def net(r):
    return "full" if r.get("width_divisor", 1) == 1 and r.get("stages", [2, 5, 5, 2]) == [2, 5, 5, 2] \
        else "x".join(map(str, r["stages"])) + "/" + str(r["width_divisor"])
groups = collections.defaultdict(list)
for r in rows:
    groups[(r["model"], net(r), r["mode"], r["batch_size"], r["framework"])].append(r)
print()
print("| model | net | mode | batch | framework | img/s (median of runs) | step ms | peak RSS MiB | vs PyTorch | vs Keras |")
print("|---|---|---|---|---|---|---|---|---|---|")
keys = sorted({k[:4] for k in groups})
for key in keys:
    ips = {k[4]: statistics.median(r["images_per_sec"] for r in groups[k])
           for k in groups if k[:4] == key}
    for fw in sorted(ips):
        rs = groups[key + (fw,)]
        ms = statistics.median(r["median_ms"] for r in rs)
        mem = max((r.get("peak_rss_mib") or 0) for r in rs)
        ratio = lambda ref: f"{ips[fw] / ips[ref]:.2f}" if ref in ips and fw != ref else ""
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {fw} | {ips[fw]:.1f} | {ms:.1f} | {mem} | {ratio('pytorch')} | {ratio('keras')} |")
PY
