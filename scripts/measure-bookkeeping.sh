#!/usr/bin/env bash
# What candle's gradient bookkeeping costs a training step. candle-core's backward pass gives
# every gradient edge a zero-filled tensor (`GradStore::or_insert`) and then adds the edge's
# gradient into a fresh one; the crate's own backward pass (issue 22, item 2) would move a
# node's first gradient in instead. This script measures what that is worth before it is
# written: it copies the candle-core source cargo downloaded, patches its backward pass so
# that a node's first gradient replaces a zero-size placeholder (later ones are still added),
# builds examples/bench.rs against the copy (`--config patch.crates-io...`, nothing in the
# repository changes) and against the real candle-core, and runs the two in turn, round
# after round, printing each step time as a JSON line and the patched/real time ratios.
# A measurement only: the patched candle is never shipped or used by the crate.
#
#   FEATURES=onednn scripts/measure-bookkeeping.sh [ROUNDS]
#
# Environment: FEATURES (cargo features of both builds, default none), THREADS (default 2),
# OUT (default runs/measure-bookkeeping), CASES (bench arguments, one case a line). Measure
# on an idle machine. `TESTS=1` also runs tests/gradients.rs and tests/training.rs against
# the patched candle, to show that it computes the same gradients.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-4}
THREADS=${THREADS:-2}
OUT=${OUT:-runs/measure-bookkeeping}
SHRUNK="--stages 1,1,1,1 --width-divisor 4"
CASES=${CASES:-"--model resnet --mode train --batch-size 128 --steps 3 --warmup 1
--model resnet --mode train --batch-size 128 --steps 12 --warmup 2 $SHRUNK
--model plain --mode train --batch-size 32 --steps 30 --warmup 3 $SHRUNK"}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
features=()
[ -n "${FEATURES:-}" ] && features=(--features "$FEATURES")

# The candle-core source this crate builds against (Cargo.lock's version).
version=$(cargo metadata --format-version 1 | python3 -c '
import json, sys
print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "candle-core"))')
source_dir=$(cargo metadata --format-version 1 | python3 -c '
import json, os, sys
print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "candle-core"))')
patched="$OUT/candle-core-$version-patched"
rm -rf "$patched"
cp -r "$source_dir" "$patched"
python3 - "$patched/src/backprop.rs" <<'PY'
import re, sys
path = sys.argv[1]
s = open(path).read()
# `*g = g.add(&x)?` -> `*g = accumulate(&*g, &x)?` at every gradient edge.
s, edges = re.subn(r"\*(\w+) = \1\.add\((&.*)\)\?(;?)$",
                   lambda m: f"*{m[1]} = accumulate(&*{m[1]}, {m[2]})?{m[3]}", s, flags=re.M)
zero_fill = """            Entry::Vacant(entry) => {
                let grad = tensor.zeros_like()?;"""
assert edges > 0 and zero_fill in s, "candle-core's backprop.rs changed: update the patch"
s = s.replace(zero_fill, """            Entry::Vacant(entry) => {
                // A broadcast zero scalar: no buffer, recognized by its zero strides.
                let grad = match tensor.elem_count() > 1 {
                    true => Tensor::zeros((), tensor.dtype(), tensor.device())?
                        .broadcast_as(tensor.shape())?,
                    false => tensor.zeros_like()?,
                };""")
s += """
/// The first gradient of a node replaces its placeholder; later ones are added.
fn accumulate(sum: &Tensor, g: &Tensor) -> Result<Tensor> {
    let placeholder = sum.elem_count() > 1 && sum.layout().stride().iter().all(|&s| s == 0);
    match (placeholder, g.is_contiguous()) {
        (true, true) => Ok(g.clone()),
        (true, false) => g.contiguous(),
        (false, _) => sum.add(g),
    }
}
"""
open(path, "w").write(s)
print(f"patched {edges} gradient edges", file=sys.stderr)
PY
patch_flag=(--config "patch.crates-io.candle-core.path=\"$patched\"")
cargo build --release --example bench "${features[@]}" >&2
cp target/release/examples/bench "$OUT/bench-candle"
CARGO_TARGET_DIR="$OUT/target" cargo build --release --example bench "${features[@]}" "${patch_flag[@]}" >&2
cp "$OUT/target/release/examples/bench" "$OUT/bench-patched"
if [ "${TESTS:-0}" = 1 ]; then
  CARGO_TARGET_DIR="$OUT/target" cargo test --release "${features[@]}" "${patch_flag[@]}" \
    --test gradients --test training >&2
fi

RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS OMP_WAIT_POLICY=passive
for round in $(seq "$ROUNDS"); do
  echo "round $round" >&2
  while IFS= read -r args; do
    [ -n "$args" ] || continue
    for side in candle patched; do
      # shellcheck disable=SC2086
      line=$("$OUT/bench-$side" $args | tail -1)
      printf '{"side": "%s", "round": %d, "args": "%s", "result": %s}\n' \
        "$side" "$round" "$args" "$line" | tee -a "$RESULTS"
    done
  done <<< "$CASES"
done
python3 - "$RESULTS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
times = {}
for r in rows:
    times.setdefault(r["args"], {}).setdefault(r["round"], {})[r["side"]] = r["result"]["median_ms"]
print("\npatched/real candle step time, per round and median; below 1 is faster")
for args, per_round in times.items():
    ratios = [t["patched"] / t["candle"] for t in per_round.values() if len(t) == 2]
    print(json.dumps({"args": args, "ratios": [round(x, 3) for x in ratios],
                      "median_ratio": round(statistics.median(ratios), 3)}))
PY
