#!/usr/bin/env bash
# Compiles every CUDA source of csrc/sources.txt, and the CUDA branches of its C++ files, with
# nvcc, compile only (no GPU needed), against the installed torch's headers, so CUDA code cannot
# rot unseen on CPU-only machines.
# Usage: scripts/check_cuda_compile.sh [file.cu ...]   (default: all of them)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "check_cuda_compile: nvcc not found" >&2; exit 1; }
TORCH_INC=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
PY_INC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
ABI=$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
ARCH=${GKV_CUDA_ARCHS:-90a}
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  # The .cu files, and the C++ files with a CUDA-only branch (nvcc hands those to the host
  # compiler with the CUDA headers on the path).
  mapfile -t files < <(grep -E '\.cu$' csrc/sources.txt; grep -lE '^#if(def)? .*GKV_WITH_CUDA' \
    $(grep -E '\.cpp$' csrc/sources.txt) csrc/python/*.cpp)
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# torch's CPU wheel ships the c10/cuda headers but not this generated one; it only sets the
# shared-library flag (same content as in CUDA builds of torch).
if ! [ -f "$(python -c "import torch,os;print(os.path.dirname(torch.__file__))")/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$out/shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
fi
for f in "${files[@]}"; do
  echo "nvcc -c $f"
  "$NVCC" -c "$f" -o "$out/$(basename "$f").o" -std=c++20 -O3 --expt-relaxed-constexpr \
    -gencode=arch=compute_${ARCH},code=sm_${ARCH} -Icsrc -I"$out/shim" $TORCH_INC -I"$PY_INC" \
    -D_GLIBCXX_USE_CXX11_ABI=$ABI -DGKV_WITH_CUDA=1 \
    -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    --resource-usage -Xptxas=-warn-spills 2>&1 | grep -vE '^$' | sed 's/^/  /' || true
  test -s "$out/$(basename "$f").o" || { echo "check_cuda_compile: $f failed" >&2; exit 1; }
done
echo "check_cuda_compile: ${#files[@]} CUDA files compiled"
