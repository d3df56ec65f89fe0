#!/usr/bin/env bash
# Does data-parallel training reach the accuracy of one process? Trains the article's ResNet
# (shrunken by default, so that it fits a CPU) with examples/train_cifar10 as one process and
# as N ranks under `mpirun`, at the same global batch, epochs and seed, for each seed given;
# then prints every run's validation accuracy per epoch and a summary table (final and best
# accuracy, wall time) as Markdown. Seeds beside each other show the noise the 1-vs-N
# difference must be compared with.
#
#   scripts/accuracy-distributed.sh DATA_DIR [RANKS]
#
# Environment: SEEDS (default "0 1"), EPOCHS (4), SUBSET (training records, 20000; 0 = all),
# BATCH (global batch, 64), TRAIN_ARGS (default: the shrunken ResNet, `--model resnet
# --width-divisor 4 --stages 1,1,1,1`), THREADS (compute threads of the single process, 2;
# each rank gets THREADS / RANKS, at least 1), OUT (runs/accuracy-distributed).
# Needs Open MPI (Debian: openmpi-bin libopenmpi-dev libclang-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/accuracy-distributed.sh DATA_DIR [RANKS]}
RANKS=${2:-2}
SEEDS=${SEEDS:-"0 1"}
EPOCHS=${EPOCHS:-4}
SUBSET=${SUBSET:-20000}
BATCH=${BATCH:-64}
THREADS=${THREADS:-2}
TRAIN_ARGS=${TRAIN_ARGS:-"--model resnet --width-divisor 4 --stages 1,1,1,1"}
OUT=${OUT:-runs/accuracy-distributed}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
per_rank=$(( THREADS / RANKS )); (( per_rank >= 1 )) || per_rank=1

cargo build --release --features distributed --example train_cifar10 >&2
bin=target/release/examples/train_cifar10
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1); $(nproc) cores; flags: $(grep -o -w -E 'avx2|fma|avx512f|avx512bw|avx512_vnni|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')" >&2

# shellcheck disable=SC2086 # TRAIN_ARGS is a list of flags
common="--data-dir $DATA --epochs $EPOCHS --subset $SUBSET --batch-size $BATCH --quiet $TRAIN_ARGS"
for seed in $SEEDS; do
  start=$(date +%s)
  RAYON_NUM_THREADS=$THREADS $bin $common --seed "$seed" --out "$OUT/seed$seed-1x$THREADS" >&2
  echo "seed $seed 1x$THREADS wall_s $(( $(date +%s) - start ))" > "$OUT/seed$seed-1x$THREADS/wall.txt"
  start=$(date +%s)
  mpirun -np "$RANKS" --oversubscribe --bind-to none -x RAYON_NUM_THREADS=$per_rank \
    $bin $common --seed "$seed" --out "$OUT/seed$seed-${RANKS}x$per_rank" >&2
  echo "seed $seed ${RANKS}x$per_rank wall_s $(( $(date +%s) - start ))" > "$OUT/seed$seed-${RANKS}x$per_rank/wall.txt"
done

python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    for hist in sorted(run.glob("*/history.json")):
        h = json.loads(hist.read_text())
        acc = [e.get("val_accuracy") for e in h["epochs"]]
        loss = [e.get("val_loss") for e in h["epochs"]]
        wall = (run / "wall.txt").read_text().split()[-1]
        print(json.dumps({"run": run.name, "model": hist.parent.name, "val_accuracy": acc, "val_loss": loss, "wall_s": int(wall)}))
        rows.append((run.name, hist.parent.name, acc, wall))
print("\n| run | model | val accuracy per epoch | final | best | wall s |\n|---|---|---|---|---|---|")
for name, model, acc, wall in rows:
    per_epoch = " / ".join(f"{100 * a:.2f}" for a in acc)
    print(f"| {name} | {model} | {per_epoch} | {100 * acc[-1]:.2f}% | {100 * max(acc):.2f}% | {wall} |")
PY
