#!/usr/bin/env bash
# Compiles the CUDA kernel with plain nvcc (no torch headers, no GPU needed), so a kernel that does
# not build fails CI even on machines without a GPU. Skips when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")"

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then
  NVCC=/usr/local/cuda/bin/nvcc
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compiles: nvcc not found, skipping the CUDA compile check"
  exit 0
fi

# sm_90 (Hopper) by default; override with e.g. CUDA_ARCH=sm_80.
ARCH="${CUDA_ARCH:-sm_90}"
OBJ="$(mktemp "${TMPDIR:-/tmp}/sketch_cuda.XXXXXX.o")"
trap 'rm -f "$OBJ"' EXIT
"$NVCC" -std=c++17 -O3 -arch="$ARCH" -Xcompiler -Wall -c cuda/sketch_cuda.cu -o "$OBJ"
echo "check_cuda_compiles: cuda/sketch_cuda.cu compiles for $ARCH with $("$NVCC" --version | tail -n 1)"
