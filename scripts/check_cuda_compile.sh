#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc for sm_80 and sm_90a, compile only (no GPU, no link), so CUDA
# errors surface on a machine with a CPU-only torch. torch.utils.cpp_extension computes no
# CUDA_HOME with a CPU torch, so include paths and flags are passed explicitly here.
#   scripts/check_cuda_compile.sh            # uses $PYTHON or python, nvcc from $NVCC, PATH or /usr/local/cuda
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  for cand in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [[ -x "$cand" ]]; then NVCC="$cand"; break; fi
  done
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 2
fi

mapfile -t FLAGS < <("$PYTHON" - <<'PY'
import sysconfig
import torch
from torch.utils import cpp_extension

for p in cpp_extension.include_paths():
    print(f"-I{p}")
print(f"-I{sysconfig.get_paths()['include']}")
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
# The C++ standard torch's own extension builds use (C++20 from torch 2.10 on, C++17 before).
with open(cpp_extension.__file__) as f:
    print("-std=c++20" if "-std=c++20" in f.read() else "-std=c++17")
PY
)

shopt -s nullglob
SOURCES=("$ROOT"/csrc/*.cu)
if (( ${#SOURCES[@]} == 0 )); then
  echo "check_cuda_compile: no csrc/*.cu files" >&2
  exit 1
fi
OUTDIR="$(mktemp -d /tmp/dit_fast_nvcc.XXXXXX)"
trap 'rm -rf "$OUTDIR"' EXIT

# A CPU torch wheel ships the c10/cuda headers but not this CMake-generated one; a CUDA build's
# copy holds just this define. Searched after torch's own include dirs, so a real copy wins.
SHIM="$OUTDIR/shim"
mkdir -p "$SHIM/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$SHIM/c10/cuda/impl/cuda_cmake_macros.h"

echo "nvcc: $NVCC ($("$NVCC" --version | tail -1))"
status=0
for src in "${SOURCES[@]}"; do
  name="$(basename "$src" .cu)"
  start=$SECONDS
  if "$NVCC" -c "$src" -o "$OUTDIR/$name.o" \
      -O3 -lineinfo -Xcompiler -fPIC \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
      -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -DDIT_FAST_WITH_CUDA \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      --expt-relaxed-constexpr -I"$ROOT/csrc" "${FLAGS[@]}" -Xcompiler "-idirafter,$SHIM" -I"$SHIM"; then
    echo "ok   $name.cu ($((SECONDS - start)) s)"
  else
    echo "FAIL $name.cu" >&2
    status=1
  fi
done
exit $status
