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
# Environment: TORCH_PY (an interpreter with torch), BATCH (default 128), REPS (default 3),
# THREADS (default 2), OUT (default runs/compare-layers). Measure on an idle machine.
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
cargo build --release --example layer_profile --example fma_peak >&2
"$TORCH_PY" -c 'import torch' || { echo "no torch in $TORCH_PY (set TORCH_PY)" >&2; exit 1; }
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
./target/release/examples/fma_peak --threads "$THREADS" | tee -a "$RESULTS"
for round in $(seq "$ROUNDS"); do
  echo "round $round" >&2
  ./target/release/examples/layer_profile --batch-size "$BATCH" --reps "$REPS" | tee -a "$RESULTS"
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
print("| layer | crate fwd ms | torch fwd ms | fwd ratio | crate bwd ms | torch bwd ms | bwd ratio | crate GFLOP/s fwd/bwd | torch GFLOP/s fwd/bwd |")
print("|---|---|---|---|---|---|---|---|---|")
total = {"crate": [0, 0], "pytorch": [0, 0]}
for layer in layers:
    c, t = by.get((layer, "candle-functional"), []), by.get((layer, "pytorch"), [])
    if layer == "adam_all_params":
        cs, ts = med(c, "step_ms"), med(t, "step_ms")
        print(f"| adam, all {c[0]['parameters'] if c else '?'} parameters | {cs:.1f} | {ts:.1f} | {cs/ts:.2f} | | | | | |")
        continue
    cf, cb, tf, tb = med(c, "forward_ms"), med(c, "backward_ms"), med(t, "forward_ms"), med(t, "backward_ms")
    g = lambda rs: "/".join("-" if med(rs, k) is None else f"{med(rs, k):.0f}" for k in ("forward_gflops", "backward_gflops"))
    ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
    print(f"| {layer} | {cf:.2f} | {tf:.2f} | {ratio(cf, tf)} | {cb:.2f} | {tb:.2f} | {ratio(cb, tb)} | {g(c)} | {g(t)} |")
PY
