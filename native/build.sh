#!/usr/bin/env bash
# Builds libpeftserve_cuda.so (CUDA graphs and libtorch's current stream for PeftServe, see
# peftserve_cuda.cpp) against the libtorch that PeftServe will run with. Needs g++, CUDA's headers and
# libtorch's headers and libraries. The plain TorchSharp path needs none of this: without the helper,
# decode runs eagerly.
#   native/build.sh [OUT_DIR]            (default: native/build)
# Finds libtorch in $LIBTORCH (an unpacked libtorch folder with include/ and lib/), else in python's torch
# package (the GPU machine's case); CUDA's headers in $CUDA_HOME (default /usr/local/cuda).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
mkdir -p "$out"
torch=${LIBTORCH:-$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null || true)}
[ -n "$torch" ] && [ -d "$torch/include" ] || { echo "build.sh: no libtorch headers (set LIBTORCH, or install python torch)" >&2; exit 1; }
cuda=${CUDA_HOME:-/usr/local/cuda}
[ -f "$cuda/include/cuda_runtime_api.h" ] || { echo "build.sh: no CUDA headers under $cuda (set CUDA_HOME)" >&2; exit 1; }
g++ -O2 -shared -fPIC -std=c++17 "$here/peftserve_cuda.cpp" -o "$out/libpeftserve_cuda.so" \
  -I"$torch/include" -I"$torch/include/torch/csrc/api/include" -I"$cuda/include" \
  -L"$torch/lib" -Wl,-rpath,"$torch/lib" -ltorch_cuda -lc10_cuda -lc10 -ltorch_cpu
echo "built $out/libpeftserve_cuda.so against $torch"
