#!/usr/bin/env bash
# Before and after a change, side by side: examples/bench.rs built from a git revision (BEFORE,
# default HEAD) and from the working tree, once per build in BUILDS, then every case run with
# each binary in turn, round after round. A noisy machine (another tenant's memory traffic)
# moves every binary's time up and down together, so the result is the after/before time
# ratio within each round, and the median of those ratios. Prints every measurement as a
# JSON line, then one summary line per case and build.
#
#   BEFORE=HEAD BUILDS="default onednn" scripts/compare-commits.sh [ROUNDS]
#
# Environment: BEFORE (a git revision, default HEAD), BUILDS (as in compare-cpu.sh, default
# "default"), THREADS (default 2), OUT (default runs/compare-commits), BEFORE_TARGET (the
# cargo target folder of BEFORE's builds, kept between runs; default OUT/before-target),
# CASES (bench arguments, one case a line; default: the full ResNet training at batch 128,
# the shrunken ResNet training at batch 128, the shrunken PlainNet at batch 32, and
# one-image inference).
# Measure on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-4}
BEFORE=${BEFORE:-HEAD}
THREADS=${THREADS:-2}
OUT=${OUT:-runs/compare-commits}
SHRUNK="--stages 1,1,1,1 --width-divisor 4"
CASES=${CASES:-"--model resnet --mode train --batch-size 128 --steps 3 --warmup 1
--model resnet --mode train --batch-size 128 --steps 12 --warmup 2 $SHRUNK
--model plain --mode train --batch-size 32 --steps 30 --warmup 3 $SHRUNK
--model resnet --mode infer --batch-size 1 --steps 20 --warmup 5
--model resnet --mode infer --batch-size 1 --steps 50 --warmup 10 $SHRUNK
--model plain --mode infer --batch-size 1 --steps 20 --warmup 5"}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
source scripts/builds.sh

# The working tree's binaries, then BEFORE's from a worktree of its own, with a target folder
# of its own: the two trees' builds must not overwrite each other.
build_each bench "$OUT"
for name in "${names[@]}"; do mv "$OUT/bench-$name" "$OUT/after-$name"; done
tree="$OUT/before-tree"
git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
git worktree add --force --detach "$tree" "$BEFORE" >&2
(cd "$tree" && export CARGO_TARGET_DIR=${BEFORE_TARGET:-$OUT/before-target} \
  && source "$OLDPWD/scripts/builds.sh" && build_each bench "$OUT")
for name in "${names[@]}"; do mv "$OUT/bench-$name" "$OUT/before-$name"; done
git worktree remove --force "$tree"

export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS OMP_WAIT_POLICY=passive
for round in $(seq "$ROUNDS"); do
  echo "round $round" >&2
  while IFS= read -r args; do
    [ -n "$args" ] || continue
    for name in "${names[@]}"; do
      for side in before after; do
        # shellcheck disable=SC2086
        line=$("$OUT/$side-$name" $args | tail -1)
        printf '{"side": "%s", "build": "%s", "round": %d, "args": "%s", "result": %s}\n' \
          "$side" "$name" "$round" "$args" "$line" | tee -a "$RESULTS"
      done
    done
  done <<< "$CASES"
done
python3 - "$RESULTS" "$BEFORE" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
times = {}
for r in rows:
    times.setdefault((r["args"], r["build"]), {}).setdefault(r["round"], {})[r["side"]] = r["result"]["median_ms"]
print(f"\nafter (working tree) / before ({sys.argv[2]}) step time, per round and median; below 1 is faster")
for (args, build), per_round in times.items():
    ratios = [t["after"] / t["before"] for t in per_round.values() if {"after", "before"} <= t.keys()]
    print(json.dumps({"args": args, "build": build, "ratios": [round(x, 3) for x in ratios],
                      "median_ratio": round(statistics.median(ratios), 3)}))
PY
