#!/usr/bin/env bash
# On the GPU machine (no Rust there): runs the crate's GPU checks (gpu/gpu_check.xz, built by
# `PACK=1 scripts/build-cuda.sh`) and the PyTorch reference on the same GPU in one call, and
# prints one JSON object: correctness (CPU vs CUDA outputs and gradients), training
# throughput of the article's ResNet at batch 128 in f32/TF32 (through candle's autograd and
# through the plan's own backward pass) and bf16 mixed precision, one
# epoch of 50,000 synthetic images with the device memory sampled through it (the check fails
# when it grows), what a step launches (the crate's counts and PyTorch's profiler), PyTorch's
# numbers, and the crate/PyTorch ratios.
#
#   bash scripts/gpu-check.sh [extra gpu_check args]
#   COMPILE=1 bash scripts/gpu-check.sh    # also torch.compile'd PyTorch (about a minute each)
#   DRY_RUN=1 TORCH_PY=... bash scripts/gpu-check.sh   # on a CPU machine: the plumbing, tiny sizes
#   NCCL=1 bash scripts/gpu-check.sh       # also NCCL at world size 1 (gpu_check built with
#                                          # FEATURES=cudnn,nccl PACK=1 scripts/build-cuda.sh)
#
# The memory sampler runs in the background and is stopped by its PID before the script
# reads its samples; nothing waits on it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${TORCH_PY:-${PYTHON:-python3}}
# Growth of device memory allowed between the first fifth of the epoch and its end (MiB):
# a leak of one step's graph is about 2 GB a step. The script exits 1 on growth, on no
# samples inside the epoch, or when a crate run failed.
GROWTH_LIMIT_MIB=${GROWTH_LIMIT_MIB:-512}

if [ "${DRY_RUN:-0}" = 1 ]; then
  CHECK=(./target/release/examples/gpu_check --device cpu --steps 1 --warmup 1 --epoch-images 256 --batch-size 8 --stages 1 --width-divisor 16)
  TORCH=(--device cpu --steps 1 --warmup 1 --batch-size 8 --stages 1 --width-divisor 16 --threads 2)
  sample_memory() { echo "0"; }
else
  # CUDA libraries: the ones PyTorch's wheels installed (cu13 and cuDNN).
  NVLIBS=$("$PY" -c 'import os, nvidia; print(":".join(os.path.join(r, s) for r in nvidia.__path__ for s in ("cu13/lib", "cudnn/lib", "nccl/lib") if os.path.isdir(os.path.join(r, s))))')
  export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  "$PY" -c 'import lzma, shutil; shutil.copyfileobj(lzma.open("gpu/gpu_check.xz"), open("'"$OUT"'/gpu_check", "wb"))'
  chmod +x "$OUT/gpu_check"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2 || true
  if ldd "$OUT/gpu_check" | grep 'not found' >&2; then echo "missing CUDA libraries" >&2; exit 127; fi
  CHECK=("$OUT/gpu_check" --device cuda --compare-candle-conv)
  TORCH=(--device cuda --steps 20 --warmup 5 --batch-size 128)
  sample_memory() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1; }
fi

# Correctness with full-f32 products (TF32 off), then everything with TF32 on, with device
# memory sampled every 250 ms (Unix time, MiB) in the background.
NVIDIA_TF32_OVERRIDE=0 "${CHECK[@]}" --correctness-only > "$OUT/correctness.json" 2> "$OUT/correctness.log"
CORRECTNESS_RC=$?
echo "correctness exit $CORRECTNESS_RC" >&2
: > "$OUT/nccl.json"
NCCL_RC=0
if [ "${NCCL:-0}" = 1 ]; then
  "${CHECK[@]}" --nccl > "$OUT/nccl.json" 2> "$OUT/nccl.log"
  NCCL_RC=$?
  echo "nccl exit $NCCL_RC" >&2
fi
# Every 250 ms plus nvidia-smi's own time (about 280 ms in all on the H200).
(while :; do echo "$(date +%s.%N) $(sample_memory)"; sleep 0.25; done) > "$OUT/memory.txt" 2>/dev/null &
SAMPLER=$!
"${CHECK[@]}" "$@" > "$OUT/crate.json" 2> "$OUT/crate.log"
CRATE_RC=$?
echo "crate exit $CRATE_RC" >&2
kill "$SAMPLER" 2>/dev/null
cat "$OUT/crate.log" >&2
: > "$OUT/torch.jsonl"
variants=("--tf32 --count" "--tf32 --amp bf16" "--tf32 --cudnn-benchmark" "--tf32 --amp bf16 --channels-last")
if [ "${COMPILE:-0}" = 1 ]; then variants+=("--tf32 --compile" "--tf32 --amp bf16 --compile"); fi
for extra in "${variants[@]}"; do
  # shellcheck disable=SC2086
  "$PY" scripts/torch_reference.py bench --model resnet --mode train "${TORCH[@]}" $extra 2>> "$OUT/torch.log" | tail -n 1 >> "$OUT/torch.jsonl"
done

"${PYTHON:-python3}" - "$OUT/crate.json" "$OUT/torch.jsonl" "$OUT/correctness.json" "$OUT/memory.txt" "$GROWTH_LIMIT_MIB" "$CORRECTNESS_RC" "$CRATE_RC" "${DRY_RUN:-0}" "$OUT/nccl.json" "$NCCL_RC" <<'PY'
import json, sys
def last_json(path):
    try:
        return json.loads(open(path).read().strip().splitlines()[-1])
    except Exception as e:
        return {"error": f"{path}: {e}"}
crate = last_json(sys.argv[1])
crate["correctness_tf32_off"] = last_json(sys.argv[3])
if open(sys.argv[9]).read().strip():
    crate["nccl_world_size_1"] = last_json(sys.argv[9])
torch = [json.loads(l) for l in open(sys.argv[2]) if l.strip().startswith("{")]
def pick(amp, cl=False, compiled=False, bench=False):
    for t in torch:
        if (t.get("amp") == amp and bool(t.get("channels_last")) == cl
                and bool(t.get("compile")) == compiled and bool(t.get("cudnn_benchmark")) == bench):
            return t
ref_f32, ref_bf16 = pick("none"), pick("bf16")
ratio = lambda a, b: round(a / b, 3) if a and b else None
ips = lambda r: (r or {}).get("images_per_sec")

# Device memory through the timed epoch: the first fifth against the rest.
epoch = crate.get("epoch") or {}
memory = {"samples": 0}
try:
    start, end = float(epoch["unix_start"]), float(epoch["unix_end"])
    samples = [tuple(map(float, l.split()[:2])) for l in open(sys.argv[4]) if len(l.split()) >= 2]
    during = [(t, m) for t, m in samples if start <= t <= end]
    cut = start + (end - start) / 5
    early = [m for t, m in during if t <= cut]
    late = [m for t, m in during if t > cut]
    memory = {"samples": len(during), "peak_mib": max(m for _, m in during),
              "early_max_mib": max(early), "late_max_mib": max(late),
              "growth_mib": max(late) - max(early), "limit_mib": float(sys.argv[5])}
    memory["flat"] = memory["growth_mib"] <= memory["limit_mib"]
except Exception as e:
    memory["error"] = f"no samples inside the epoch: {e}"

out = {
    "crate": crate,
    "device_memory_during_epoch": memory,
    "pytorch": {"f32_tf32": ref_f32, "bf16": ref_bf16,
                "f32_tf32_cudnn_benchmark": pick("none", bench=True),
                "bf16_channels_last": pick("bf16", cl=True),
                "f32_tf32_compiled": pick("none", compiled=True),
                "bf16_compiled": pick("bf16", compiled=True)},
    "ratio_crate_over_pytorch": {
        "f32_tf32": ratio(ips(crate.get("train_f32_tf32")), ips(ref_f32)),
        "f32_tf32_plan": ratio(ips(crate.get("train_f32_tf32_plan")), ips(ref_f32)),
        "bf16": ratio(ips(crate.get("train_bf16_mixed")), ips(ref_bf16)),
    },
    "conv3x3_speedup_over_candle_own": ratio((crate.get("conv3x3_fwd_bwd_ms") or {}).get("candle_reference"), (crate.get("conv3x3_fwd_bwd_ms") or {}).get("ops")),
}
out["exit_codes"] = {"correctness": int(sys.argv[6]), "crate": int(sys.argv[7]), "nccl": int(sys.argv[10])}
print(json.dumps(out, indent=1))
# Fails when a run failed, or when the memory check found growth or had nothing to check
# (a dry run on the CPU has no device memory to sample).
memory_ok = memory.get("flat", False) or sys.argv[8] == "1"
sys.exit(0 if memory_ok and sys.argv[6] == "0" and sys.argv[7] == "0" and sys.argv[10] == "0" else 1)
PY
