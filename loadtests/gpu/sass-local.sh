#!/usr/bin/env bash
# How NVRTC compiles our kernels, read on a machine without a GPU: registers, stack (local memory) and the longest run
# of global loads issued before an FMA (or tensor-core MMA) uses one, per kernel, from the SASS of an sm_90 CUBIN
# (sass-report.sh). The GPU machine's NVRTC (13.x) is newer than the one used here (Debian 12's CUDA 11.8, from its
# non-free section: libnvrtc, and cuobjdump from nvidia-cuda-toolkit; downloaded once, about 100 MB, into
# $PEFTSERVE_SASS_TOOLS, the system's apt sources untouched), so take the figures as a check of the shape of the code,
# not of the GPU's exact registers; run-all.sh's sass section reads the GPU's own. It found the adapter-term kernels'
# loads sunk next to their FMAs (2026-12-03; row_terms.cuh).
#   bash loadtests/gpu/sass-local.sh                   the adapter-term kernels, decode attention, NF4; bf16, 7B shapes
#   KERNELS=REGEX bash loadtests/gpu/sass-local.sh FILE.cu NAME=VALUE ...   one file with its -D constants (kernels whose
#                                                          names match REGEX whole)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
tools=${PEFTSERVE_SASS_TOOLS:-$HOME/.cache/peftserve/sass-tools}
if [ ! -x "$tools/x/usr/bin/cuobjdump" ] || [ ! -e "$tools/x/usr/lib/x86_64-linux-gnu/libnvrtc.so.11.2" ]; then
  echo "fetching Debian's libnvrtc and cuobjdump (non-free, CUDA 11.8) into $tools"
  mkdir -p "$tools/lists/partial" "$tools/cache/archives/partial"
  echo "deb http://deb.debian.org/debian bookworm main contrib non-free" > "$tools/sources.list"
  apt_opts=(-o Dir::Etc::SourceList="$tools/sources.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$tools/lists" -o Dir::Cache="$tools/cache")
  apt-get -qq "${apt_opts[@]}" update
  (cd "$tools" && apt-get -qq "${apt_opts[@]}" download nvidia-cuda-toolkit libnvrtc11.2 libnvrtc-builtins11.8 2>&1 | grep -v "unsandboxed" || true)
  for deb in "$tools"/*.deb; do dpkg -x "$deb" "$tools/x"; done
fi
export LD_LIBRARY_PATH="$tools/x/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cuobj="$tools/x/usr/bin/cuobjdump"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
compile() {  # FILE NAME=VALUE...
  local file=$1; shift
  echo "$file $*"
  python3 "$repo/loadtests/gpu/nvrtc_compile.py" "$tools/x/usr/lib/x86_64-linux-gnu/libnvrtc.so.11.2" "$repo/src/PeftServe.Core/Kernels" \
    "$file" "$work/out.cubin" "$@" && bash "$repo/loadtests/gpu/sass-report.sh" "$cuobj" "$work/out.cubin" "${KERNELS:-.*}"
}
if [ $# -gt 0 ]; then compile "$@"; exit; fi
compile bgmv.cu ELEM_TYPE=bf16_t SHRINK_RANKS=2
compile fused.cu ELEM_TYPE=bf16_t
compile paged_attention.cu ELEM_TYPE=bf16_t HEAD_DIM=128 GROUP=1 WARPS=16
KERNELS='nf4_mma_bf16_n[0-9]|nf4_gemv_whole_bf16_m1|nf4_dequant_bf16' compile nf4.cu MMA_MT=1 MMA_PREFETCH=2 MMA_XSMEM=1
