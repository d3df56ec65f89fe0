#!/usr/bin/env bash
# Per-layer CPU profile, side by side: examples/layer_profile.rs (the crate) and
# `scripts/torch_reference.py layers` (PyTorch), the same cases at the article's ResNet shapes
# (forward and backward of each layer type in training mode, the Adam update of all 15.6M
# parameters), run alternately round after round. Prints every measurement as a JSON line,
# then a table of medians (ms) with the crate/PyTorch time ratios, the GFLOP/s of the
# convolutions, and the machine's FMA peak (examples/fma_peak.rs) for scale.
#
#   TORCH_PY=/path/to/venv/bin/python scripts/compare-layers.sh [ROUNDS]
#
#   BUILDS="default onednn" TORCH_PY=... scripts/compare-layers.sh 2   # a column per build
#
# Environment: TORCH_PY (an interpreter with torch), BATCH (default 128), REPS (default 3),
# THREADS (default 2), OUT (default runs/compare-layers), BUILDS (builds of the crate, as in
# compare-cpu.sh: `default`, a cargo feature added to the defaults such as `onednn`, or
# NAME:FLAGS; default "default"). Measure on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-1}
BATCH=${BATCH:-128}
REPS=${REPS:-3}
THREADS=${THREADS:-2}
OUT=${OUT:-runs/compare-layers}
TORCH_PY=${TORCH_PY:-python3}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
cargo build --release --example fma_peak >&2
cp target/release/examples/fma_peak "$OUT/fma_peak"
source scripts/builds.sh
build_each layer_profile "$OUT"
"$TORCH_PY" -c 'import torch' || { echo "no torch in $TORCH_PY (set TORCH_PY)" >&2; exit 1; }
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
"$OUT/fma_peak" --threads "$THREADS" | tee -a "$RESULTS"
for round in $(seq "$ROUNDS"); do
  echo "round $round" >&2
  for name in "${names[@]}"; do
    # A build other than the default is its own column, "candle-functional[NAME]".
    label=candle-functional; [ "$name" = default ] || label="candle-functional[$name]"
    "$OUT/layer_profile-$name" --batch-size "$BATCH" --reps "$REPS" \
      | sed "s/\"framework\": \"candle-functional\"/\"framework\": \"$label\"/" | tee -a "$RESULTS"
  done
  "$TORCH_PY" scripts/torch_reference.py layers --batch-size "$BATCH" --reps "$REPS" --threads "$THREADS" | tee -a "$RESULTS"
done
python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
peak = next((r for r in rows if r.get("kind") == "fma_peak"), None)
by = {}
for r in rows:
    if "layer" in r:
        by.setdefault((r["layer"], r["framework"]), []).append(r)
layers = []
for (layer, _) in by:
    if layer not in layers:
        layers.append(layer)
med = lambda rs, k: statistics.median(r[k] for r in rs) if rs and rs[0].get(k) is not None else None
cpu = next((r.get("cpu") for r in rows if r.get("cpu")), "unknown")
print(f"\nCPU: {cpu}; threads {rows[-1].get('threads')}; rounds {len(by.get((layers[0], 'pytorch'), []))}")
if peak:
    print(f"FMA peak (f32): {peak['gflops']:.1f} GFLOP/s on {peak['threads']} threads ({peak['isa']})")
crates = [f for f in dict.fromkeys(r["framework"] for r in rows if "layer" in r) if f != "pytorch"]
short = lambda f: "crate" if f == "candle-functional" else f.replace("candle-functional", "crate")
head = " | ".join(f"{short(f)} fwd ms | /torch" for f in crates)
headb = " | ".join(f"{short(f)} bwd ms | /torch" for f in crates)
gf = " | ".join(f"{short(f)} GFLOP/s fwd/bwd" for f in crates)
print(f"| layer | torch fwd ms | {head} | torch bwd ms | {headb} | torch GFLOP/s fwd/bwd | {gf} |")
print("|---" * (4 + 4 * len(crates) + len(crates)) + "|")
ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
g = lambda rs: "/".join("-" if med(rs, k) is None else f"{med(rs, k):.0f}" for k in ("forward_gflops", "backward_gflops"))
for layer in layers:
    t = by.get((layer, "pytorch"), [])
    cs = [by.get((layer, f), []) for f in crates]
    if layer == "adam_all_params":
        ts = med(t, "step_ms")
        cells = " | ".join(f"{med(c, 'step_ms'):.1f} | {ratio(med(c, 'step_ms'), ts)}" for c in cs)
        print(f"| adam, all {cs[0][0]['parameters'] if cs[0] else '?'} parameters (step) | {ts:.1f} | {cells} | | {' | '.join(' | ' for _ in cs)} | | {' | '.join('' for _ in cs)} |")
        continue
    tf, tb = med(t, "forward_ms"), med(t, "backward_ms")
    fwd = " | ".join(f"{med(c, 'forward_ms'):.2f} | {ratio(med(c, 'forward_ms'), tf)}" for c in cs)
    bwd = " | ".join(f"{med(c, 'backward_ms'):.2f} | {ratio(med(c, 'backward_ms'), tb)}" for c in cs)
    print(f"| {layer} | {tf:.2f} | {fwd} | {tb:.2f} | {bwd} | {g(t)} | {' | '.join(g(c) for c in cs)} |")
PY
