#!/usr/bin/env bash
# The article's experiment at full scale on the GPU machine: 20 epochs of the ResNet and of the
# PlainNet on all 50,000 CIFAR-10 training images, validated on the 10,000 test images, with
# the article's recipe (Adam 1e-3, batch 128, raw pixels; train_cifar10's defaults). One call
# of the device tool may run 10 minutes, so the networks run as separate calls on the warm
# machine, which keeps the unpacked data and the run folder between them:
#
#   bash scripts/gpu-experiment.sh resnet    # ~5-6 min on an H100 at the last measured speed
#   bash scripts/gpu-experiment.sh plain
#   bash scripts/gpu-experiment.sh compare   # no training: comparison.png/.md from both runs
#
# Carried to the machine (git-ignored gpu/): gpu/train_cifar10.xz (`PACK=1
# EXAMPLES=train_cifar10 scripts/build-cuda.sh`) and gpu/cifar-10-pack/ (a copy of
# ../shared/data/cifar-10-pack: `cp -r ../shared/data/cifar-10-pack gpu/`), 24 MB together.
# Results (histories, curves, comparison, logs; not the weights) are copied to $OUT.
#
#   DRY_RUN=1 DATA_DIR=../shared/data/cifar-10-mini bash scripts/gpu-experiment.sh resnet
#       on a CPU machine: the same plumbing with the CPU build, a tiny network, one epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:?usage: gpu-experiment.sh resnet|plain|compare}
OUT=${OUT:-/tmp/gpu-experiment-out}
WORK=${WORK:-/tmp/gpu-experiment}
RUN="$WORK/run"
mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}

if [ "${DRY_RUN:-0}" = 1 ]; then
  BIN=./target/release/examples/train_cifar10
  [ -x "$BIN" ] || cargo build --release --example train_cifar10 >&2
  DATA=${DATA_DIR:?DRY_RUN needs DATA_DIR (a cifar-10-batches-bin layout, e.g. cifar-10-mini)}
  EPOCHS=${EPOCHS:-1}
  EXTRA=(--device cpu --stages 1 --width-divisor 16 --subset 256 --test-subset 128)
else
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
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2 || true
  EXTRA=(--device cuda)
fi

case "$STEP" in
  resnet | plain) MODEL=$STEP ;;
  compare) MODEL=both ;;
  *) echo "unknown step '$STEP': resnet, plain or compare" >&2; exit 2 ;;
esac
start=$(date +%s)
# --resume: a step cut short by the 10-minute limit continues where its checkpoint stopped;
# for `compare` both runs are complete, so nothing trains and only the comparison is written.
"$BIN" --model "$MODEL" --epochs "${EPOCHS:-20}" --data-dir "$DATA" --out "$RUN" --resume --quiet \
  "${EXTRA[@]}" 2> >(tee "$OUT/$STEP.log" >&2) | tee "$OUT/$STEP.out"
echo "$STEP: $(( $(date +%s) - start )) s" | tee -a "$OUT/$STEP.log" >&2
# Everything but the weights and checkpoints, to bring back.
(cd "$RUN" && find . -type f ! -name '*.ckpt' ! -name '*.safetensors' -print0 \
  | xargs -0 -r cp --parents -t "$OUT")
ls -R "$OUT" >&2
