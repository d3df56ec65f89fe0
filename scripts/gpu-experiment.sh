#!/usr/bin/env bash
# The article's experiment at full scale on the GPU machine, with its PyTorch twin: 20 epochs
# of the ResNet and of the PlainNet on all 50,000 CIFAR-10 training images, validated on the
# 10,000 test images, with the article's recipe (Adam 1e-3, batch 128, raw pixels;
# train_cifar10's defaults), the crate's two runs and PyTorch's two runs at once on one GPU.
#
# The four runs start detached (setsid), so they outlive the device tool's call that starts
# them; a later call on the still-warm machine waits for them. Nothing here waits on a
# monitor: every wait has a deadline.
#
#   bash scripts/gpu-experiment.sh start [SECONDS]   # starts the runs, waits up to SECONDS (default 0)
#   bash scripts/gpu-experiment.sh wait SECONDS      # waits up to SECONDS for them to finish
#   bash scripts/gpu-experiment.sh collect           # copies histories and curves to $OUT
#
# `start` and `wait` also collect; `start 600` is the whole experiment in one call when the
# runs take less than 10 minutes. Each run writes its history after every epoch and resumes
# from its checkpoint when started again (`start` on a machine that has the run folder).
#
# Carried to the machine (git-ignored gpu/): gpu/train_cifar10.xz (`PACK=1
# EXAMPLES=train_cifar10 scripts/build-cuda.sh`) and gpu/cifar-10-pack/ (a copy of
# ../shared/data/cifar-10-pack: `cp -r ../shared/data/cifar-10-pack gpu/`). Results
# (histories, curves, the comparison, logs; not the weights) are copied to $OUT.
#
#   DRY_RUN=1 DATA_DIR=../shared/data/cifar-10-mini TORCH_PY=... bash scripts/gpu-experiment.sh start 600
#       on a CPU machine: the same plumbing with the CPU build, tiny networks, one epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:?usage: gpu-experiment.sh start|wait|collect [SECONDS]}
SECONDS_TO_WAIT=${2:-0}
OUT=${OUT:-/tmp/gpu-experiment-out}
WORK=${WORK:-/tmp/gpu-experiment}
RUN="$WORK/run"
LOGS="$WORK/logs"
mkdir -p "$OUT" "$RUN" "$LOGS"
PY=${TORCH_PY:-${PYTHON:-python3}}
EPOCHS=${EPOCHS:-20}

prepare() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    BIN=./target/release/examples/train_cifar10
    [ -x "$BIN" ] || cargo build --release --example train_cifar10 >&2
    DATA=${DATA_DIR:?DRY_RUN needs DATA_DIR (a cifar-10-batches-bin layout, e.g. cifar-10-mini)}
    EPOCHS=${EPOCHS_DRY:-1}
    CRATE_EXTRA=(--device cpu --stages 1 --width-divisor 16 --subset 256 --test-subset 128)
    TORCH_EXTRA=(--device cpu --stages 1 --width-divisor 16 --subset 256 --threads 1)
    return
  fi
  NVLIBS=$("$PY" -c 'import os, nvidia; print(":".join(os.path.join(r, s) for r in nvidia.__path__ for s in ("cu13/lib", "cudnn/lib") if os.path.isdir(os.path.join(r, s))))')
  export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  BIN="$WORK/train_cifar10"
  if [ ! -x "$BIN" ]; then
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open("gpu/train_cifar10.xz"), open(sys.argv[1], "wb"))' "$BIN"
    chmod +x "$BIN"
  fi
  if ldd "$BIN" | grep 'not found' >&2; then echo "missing CUDA libraries" >&2; exit 127; fi
  DATA="$WORK/data/cifar-10-batches-bin"
  if [ ! -f "$DATA/test_batch.bin" ]; then
    # Rebuilds the shared copy byte for byte and checks its SHA-256 sums (a few seconds).
    "$PY" gpu/cifar-10-pack/unpack.py --out "$WORK/data" --force >&2
  fi
  CRATE_EXTRA=(--device cuda)
  TORCH_EXTRA=(--device cuda)
}

# Starts one run detached, unless it is already running; its exit status goes to LOGS/NAME.rc.
launch() {
  local name=$1; shift
  if [ -f "$LOGS/$name.pid" ] && kill -0 "$(cat "$LOGS/$name.pid")" 2>/dev/null; then
    echo "$name: already running" >&2
    return
  fi
  rm -f "$LOGS/$name.rc"
  setsid bash -c '"$@" > "'"$LOGS/$name.out"'" 2> "'"$LOGS/$name.log"'"; echo $? > "'"$LOGS/$name.rc"'"' _ "$@" \
    < /dev/null > /dev/null 2>&1 &
  echo $! > "$LOGS/$name.pid"
  echo "$name: started" >&2
}

start() {
  prepare
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2 || true
  date +%s > "$WORK/started"
  for model in resnet plain; do
    # --resume: a run cut short continues from its checkpoint.
    launch "crate-$model" "$BIN" --model "$model" --epochs "$EPOCHS" --data-dir "$DATA" \
      --out "$RUN/crate" --resume --quiet "${CRATE_EXTRA[@]}"
    launch "torch-$model" "$PY" scripts/torch_reference.py train --model "$model" \
      --epochs "$EPOCHS" --data-dir "$DATA" --out "$RUN/torch" "${TORCH_EXTRA[@]}"
  done
}

running() {
  local n=0
  for pid in "$LOGS"/*.pid; do
    [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null && n=$((n + 1))
  done
  echo "$n"
}

wait_for_runs() {
  local deadline=$(( $(date +%s) + $1 ))
  while [ "$(running)" -gt 0 ] && [ "$(date +%s)" -lt "$deadline" ]; do
    sleep 5
  done
  echo "runs still going: $(running)" >&2
}

collect() {
  for rc in "$LOGS"/*.rc; do [ -f "$rc" ] && echo "$(basename "$rc" .rc): exit $(cat "$rc")" >&2; done
  if [ -f "$WORK/started" ]; then
    echo "elapsed since start: $(( $(date +%s) - $(cat "$WORK/started") )) s" >&2
  fi
  "${PYTHON:-python3}" scripts/compare_histories.py "$RUN" > "$RUN/comparison.md" 2> "$LOGS/compare.log" || true
  # Everything but the weights and checkpoints: histories, curves, the comparison, logs.
  (cd "$RUN" && find . -type f ! -name '*.ckpt' ! -name '*.safetensors' -print0 \
    | xargs -0 -r cp --parents -t "$OUT")
  cp "$LOGS"/*.log "$LOGS"/*.rc "$OUT"/ 2>/dev/null || true
  for h in "$RUN"/crate/*/history.json "$RUN"/torch/*_history.json; do
    [ -f "$h" ] && "${PYTHON:-python3}" -c 'import json, sys; e = json.load(open(sys.argv[1]))["epochs"]; print(sys.argv[1], len(e), "epochs, best val_accuracy", max((r.get("val_accuracy") or 0) for r in e) if e else None)' "$h" >&2
  done
}

case "$STEP" in
  start) start; wait_for_runs "$SECONDS_TO_WAIT"; collect ;;
  wait) wait_for_runs "$SECONDS_TO_WAIT"; collect ;;
  collect) collect ;;
  *) echo "unknown step '$STEP': start, wait or collect" >&2; exit 2 ;;
esac
