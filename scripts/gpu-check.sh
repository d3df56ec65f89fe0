#!/usr/bin/env bash
# On the GPU machine (no Rust there): runs the crate's GPU checks (gpu/gpu_check.xz, built by
# `PACK=1 scripts/build-cuda.sh`) and the PyTorch reference on the same GPU in one call, and
# prints one JSON object: correctness (CPU vs CUDA outputs and gradients), training
# throughput of the article's ResNet at batch 128 in f32/TF32 and bf16 mixed precision, one
# synthetic epoch, PyTorch's numbers, and the crate/PyTorch ratios.
#
#   bash scripts/gpu-check.sh [extra gpu_check args]
#   DRY_RUN=1 bash scripts/gpu-check.sh   # on a CPU machine: checks the plumbing with tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if [ "${DRY_RUN:-0}" = 1 ]; then
  CHECK=(./target/release/examples/gpu_check --device cpu --steps 1 --warmup 1 --epoch-images 256 --batch-size 8 --stages 1 --width-divisor 16)
  TORCH=(--device cpu --steps 1 --warmup 1 --batch-size 8 --stages 1 --width-divisor 16 --threads 2)
else
  # CUDA libraries: the ones PyTorch's wheels installed (cu13 and cuDNN).
  NVLIBS=$("$PY" -c 'import os, nvidia; print(":".join(os.path.join(r, s) for r in nvidia.__path__ for s in ("cu13/lib", "cudnn/lib") if os.path.isdir(os.path.join(r, s))))')
  export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  "$PY" -c 'import lzma, shutil; shutil.copyfileobj(lzma.open("gpu/gpu_check.xz"), open("'"$OUT"'/gpu_check", "wb"))'
  chmod +x "$OUT/gpu_check"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2 || true
  if ldd "$OUT/gpu_check" | grep 'not found' >&2; then echo "missing CUDA libraries" >&2; exit 127; fi
  CHECK=("$OUT/gpu_check" --device cuda --compare-candle-conv)
  TORCH=(--device cuda --steps 20 --warmup 5 --batch-size 128)
fi

# Correctness with full-f32 products (TF32 off), then everything with TF32 on.
NVIDIA_TF32_OVERRIDE=0 "${CHECK[@]}" --correctness-only > "$OUT/correctness.json" 2> "$OUT/correctness.log"
"${CHECK[@]}" "$@" > "$OUT/crate.json" 2> "$OUT/crate.log"
echo "crate exit $?" >&2; cat "$OUT/crate.log" >&2
: > "$OUT/torch.jsonl"
for extra in "--tf32" "--tf32 --amp bf16" "--tf32 --amp bf16 --channels-last" "--tf32 --compile" "--tf32 --amp bf16 --compile"; do
  # shellcheck disable=SC2086
  "$PY" scripts/torch_reference.py bench --model resnet --mode train "${TORCH[@]}" $extra 2>> "$OUT/torch.log" | tail -n 1 >> "$OUT/torch.jsonl"
done

"$PY" - "$OUT/crate.json" "$OUT/torch.jsonl" "$OUT/correctness.json" <<'PY'
import json, sys
crate = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
crate["correctness_tf32_off"] = json.loads(open(sys.argv[3]).read().strip().splitlines()[-1])
torch = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
def pick(amp, cl, compiled=False):
    for t in torch:
        if t.get("amp") == amp and bool(t.get("channels_last")) == cl and bool(t.get("compile")) == compiled:
            return t
ref_f32, ref_bf16, ref_bf16_cl = pick("none", False), pick("bf16", False), pick("bf16", True)
ref_f32_compiled, ref_bf16_compiled = pick("none", False, True), pick("bf16", False, True)
ratio = lambda a, b: round(a / b, 3) if a and b else None
out = {
    "crate": crate,
    "pytorch": {"f32_tf32": ref_f32, "bf16": ref_bf16, "bf16_channels_last": ref_bf16_cl,
                "f32_tf32_compiled": ref_f32_compiled, "bf16_compiled": ref_bf16_compiled},
    "ratio_crate_over_pytorch": {
        "f32_tf32": ratio(crate["train_f32_tf32"]["images_per_sec"], (ref_f32 or {}).get("images_per_sec")),
        "bf16": ratio((crate["train_bf16_mixed"] or {}).get("images_per_sec"), (ref_bf16 or {}).get("images_per_sec")),
        "f32_tf32_vs_compiled": ratio(crate["train_f32_tf32"]["images_per_sec"], (ref_f32_compiled or {}).get("images_per_sec")),
        "bf16_vs_compiled": ratio((crate["train_bf16_mixed"] or {}).get("images_per_sec"), (ref_bf16_compiled or {}).get("images_per_sec")),
    },
    "conv3x3_speedup_over_candle_own": ratio((crate.get("conv3x3_fwd_bwd_ms") or {}).get("candle_reference"), (crate.get("conv3x3_fwd_bwd_ms") or {}).get("ops")),
}
print(json.dumps(out, indent=1))
PY
