#!/usr/bin/env bash
# Builds the crate with candle's CUDA backend on a machine without a GPU, from nothing:
# the CUDA 13.0 compiler and libraries come from PyPI wheels (the versions PyTorch 2.11
# pins, which the GPU machine's driver 580 runs), and libcuda.so, which only a driver
# provides, is replaced at link time by a stub with the same SONAME (never shipped or run).
#
#   scripts/build-cuda.sh                      # builds --features cudnn, examples gpu_check bench train_cifar10
#   FEATURES=cuda EXAMPLES=bench scripts/build-cuda.sh
#   PACK=1 scripts/build-cuda.sh               # also writes gpu/<example>.xz (debug info stripped) to carry to the GPU machine
#   CLIPPY=1 scripts/build-cuda.sh             # then lints every target with the same features (CI)
#   FEATURES=cudnn,nccl,distributed CLIPPY=1 scripts/build-cuda.sh   # also NCCL (libnccl from PyPI) and MPI (CI)
#
# Environment: CUDA_SDK_DIR (wheel cache, default ~/.cache/candle-functional-cuda),
# CUDA_COMPUTE_CAP (default 90 = H100/H200; candle builds sm_90a), FEATURES, EXAMPLES, PACK,
# CLIPPY.
# Cold, on 2 cores, this takes about 12 minutes (mostly nvcc compiling candle's kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
SDK=${CUDA_SDK_DIR:-$HOME/.cache/candle-functional-cuda}
FEATURES=${FEATURES:-cudnn}
EXAMPLES=${EXAMPLES:-"gpu_check bench train_cifar10"}
command -v g++ >/dev/null || { echo "nvcc needs a host C++ compiler: apt-get install -y g++" >&2; exit 1; }

# 1. The toolkit, pinned: nvcc must be 13.0.x (driver 580 cannot JIT newer PTX).
if [ ! -f "$SDK/.installed-13.0" ]; then
  python3 -m venv "$SDK/venv"
  "$SDK/venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
    "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-nvrtc==13.0.88" \
    "nvidia-cublas==13.1.0.3" "nvidia-curand==10.4.0.35" "nvidia-cudnn-cu13==9.19.0.56"
  touch "$SDK/.installed-13.0"
fi
# NCCL only when asked for: 2.30.7 is the version PyTorch 2.15 (CUDA 13) pins and the one
# candle's cudarc binds (`nccl-02030`); cudarc links -lnccl.
if [[ ",$FEATURES," == *",nccl,"* ]] && [ ! -f "$SDK/.installed-nccl-2.30" ]; then
  "$SDK/venv/bin/pip" install --quiet --disable-pip-version-check "nvidia-nccl-cu13==2.30.7"
  touch "$SDK/.installed-nccl-2.30"
fi
NV=$("$SDK/venv/bin/python" -c 'import nvidia; print(list(nvidia.__path__)[0])')

# 2. A link directory: unversioned names for -lcublas etc., and the libcuda stub.
LIB="$SDK/link/lib"
mkdir -p "$LIB"
for f in "$NV/cu13/lib/libcublas.so.13" "$NV/cu13/lib/libcublasLt.so.13" "$NV/cu13/lib/libcudart.so.13" \
         "$NV/cu13/lib/libcurand.so.10" "$NV/cu13/lib/libnvrtc.so.13" "$NV/cudnn/lib/libcudnn.so.9"; do
  name=$(basename "$f")
  ln -sfn "$f" "$LIB/$name"
  ln -sfn "$name" "$LIB/${name%.so.*}.so"
done
if [ -f "$SDK/.installed-nccl-2.30" ]; then
  ln -sfn "$NV/nccl/lib/libnccl.so.2" "$LIB/libnccl.so.2"
  ln -sfn libnccl.so.2 "$LIB/libnccl.so"
fi
if [ ! -f "$LIB/libcuda.so" ]; then
  # Every cu* entry point that cuda.h declares, as a function that fails if ever called.
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$NV/cu13/include/cuda.h" | sort -u \
    | awk '{print "int " $1 "(void){return 999;}"}' > "$SDK/link/libcuda_stub.c"
  gcc -shared -fPIC -o "$LIB/libcuda.so" "$SDK/link/libcuda_stub.c" -Wl,-soname,libcuda.so.1
fi

# 3. Build, in its own target folder so the CPU build is left alone.
export PATH="$NV/cu13/bin:$PATH"
export CUDA_ROOT="$SDK/link"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
args=()
for e in $EXAMPLES; do args+=(--example "$e"); done
cargo build --release --features "$FEATURES" "${args[@]}"
if [ "${CLIPPY:-0}" = 1 ]; then
  # The CUDA-only code (cuDNN kernels, their unsafe blocks) is linted nowhere else.
  cargo clippy --release --all-targets --features "$FEATURES" -- -D warnings
fi

# 4. Optionally pack the binaries for the GPU machine: debug sections stripped (the release
# profile keeps line tables, 80 of a binary's 145 MB), then xz: about 6 MB each, so that two
# binaries and the data set fit in what one call carries (64 MiB).
if [ "${PACK:-0}" = 1 ]; then
  mkdir -p gpu
  for e in $EXAMPLES; do
    strip --strip-debug -o "gpu/$e.stripped" "$CARGO_TARGET_DIR/release/examples/$e"
    xz -6 -T2 -c "gpu/$e.stripped" > "gpu/$e.xz"
    rm "gpu/$e.stripped"
  done
  ls -l gpu
fi
echo "built --features $FEATURES: $EXAMPLES (in $CARGO_TARGET_DIR/release/examples)"
