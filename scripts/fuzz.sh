#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for RUNS inputs each (default 1,000,000), JOBS targets
# at a time (default 2), and prints one line a target: its name, the inputs run, the seconds
# taken and the outcome. Any panic, abort or crash stops that target with libFuzzer's report
# (in fuzz/logs/<target>.log) and its input (in fuzz/artifacts/<target>/), and this script
# exits non-zero.
#
#   cargo install cargo-fuzz          # once; the targets need a nightly compiler
#   RUNS=1000000 scripts/fuzz.sh      # or: scripts/fuzz.sh ops model
#
# SANITIZER=none (faster) or address (the default, cargo-fuzz's).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
RUNS="${RUNS:-1000000}"
JOBS="${JOBS:-2}"
SANITIZER="${SANITIZER:-address}"
if [ "$#" -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list); fi
mkdir -p logs
# The crate tries a large host buffer before it makes one (`support/sizes.rs`), and treats a
# refusal as an error; AddressSanitizer's allocator aborts on a request past its limit unless
# told to return null as the system allocator does.
export ASAN_OPTIONS="allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
# Build all targets first, so that the runs below do not build them in parallel.
cargo +nightly fuzz build -s "$SANITIZER"

run() {
  local t="$1" start end
  start=$(date +%s)
  # Inputs up to 64 KiB; 2 GiB resident per process. The size probe reserves buffers it
  # never touches, so single allocations are not limited (libFuzzer would call the probe an
  # out-of-memory); the resident limit still catches memory actually used.
  if cargo +nightly fuzz run -s "$SANITIZER" "$t" -- -runs="$RUNS" -max_len=65536 \
    -rss_limit_mb=2048 -malloc_limit_mb=1000000 -timeout=30 >"logs/$t.log" 2>&1; then
    outcome=ok
  else
    outcome=FAILED
  fi
  end=$(date +%s)
  done_line=$(grep -o 'Done [0-9]* runs' "logs/$t.log" | tail -1 || true)
  echo "$t runs=${done_line//[!0-9]/} seconds=$((end - start)) sanitizer=$SANITIZER $outcome"
  [ "$outcome" = ok ]
}

status=0
pids=()
for t in "${targets[@]}"; do
  run "$t" &
  pids+=($!)
  if [ "${#pids[@]}" -ge "$JOBS" ]; then
    wait "${pids[0]}" || status=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit "$status"
