#!/usr/bin/env bash
# Where a decode step's GPU time goes, kernel by kernel, on the GPU machine (Nsight Compute, one metric:
# gpu__time_duration). From the repo root with the CLI bundled in .gpu/ and the native helper built:
#   bash loadtests/gpu/kernel-profile.sh [b1] [lora32] [nf4-b1] [nf4-b32] [mix]
#   DETAIL=bgmv_expand bash loadtests/gpu/kernel-profile.sh mix      (one kernel in depth: see DETAIL below)
# Each case runs `bench` eagerly (--no-cuda-graphs: every kernel is its own launch, the same kernels the graphs
# replay) with collection off until the decode steps of its first timed wave (PEFTSERVE_PROFILER_RANGE=decode: the
# bench marks them with cuProfilerStart/Stop once every row has its first token, so loading, NF4 quantization,
# warm-up and prefill are left out; RANGE=1 marks whole timed rounds, prefill included), then times COUNT launches from
# there; the summary (loadtests/gpu/kernel_profile.py) gives per kernel the launches per decode step, the median
# time and the share of the step. Output: $OUT/kernels-CASE.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cases=${*:-b1 lora32 nf4-b1}
cli=(bash .gpu/run.sh dotnet .gpu/app/PeftServe.Cli.dll)
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
shape=loadtests/shapes/llama-2-7b
layers=$(python3 -c "import json; print(json.load(open('$shape/config.json'))['num_hidden_layers'])")
for c in $cases; do
  case $c in
    b1) args=(--concurrency 1 --requests 1); count=1500 ;;
    lora32) args=(--concurrency 32 --requests 32 --adapters 32); count=2500 ;;
    nf4-b1) args=(--concurrency 1 --requests 1 --quantize nf4); count=1500 ;;
    nf4-b32) args=(--concurrency 32 --requests 32 --quantize nf4); count=1500 ;;
    mix) args=(--concurrency 32 --requests 32 --adapters 9 --adapter-methods lora,prefix,prompt,ptuning,ia3,llama-adapter,bottleneck,adamix,bitfit); count=3000 ;;
    *) echo "unknown case $c"; continue ;;
  esac
  echo "== kernels: $c"
  if [ -n "${DETAIL:-}" ]; then
    # DETAIL=kernel_name: Nsight Compute's full sections (throughput, memory, warp stalls with their source lines,
    # occupancy) for a few decode-step launches of that kernel alone, instead of the timing of every kernel; for a kernel
    # that takes far longer than its bytes and launches explain. Output: $OUT/detail-CASE-KERNEL.txt.
    PEFTSERVE_PROFILER_RANGE=decode timeout 300 "$ncu" --profile-from-start off --kernel-name "$DETAIL" --launch-skip ${SKIP:-4} --launch-count ${COUNT:-2} \
      --set detailed --section SourceCounters --section WarpStateStats -f -o /tmp/detail-$c "${cli[@]}" bench --model $shape --random-weights \
      --prompt-tokens 128 --max-tokens ${TOKENS:-32} --device cuda --dtype bfloat16 --mode waves --warmup 1 --repeats 1 --no-cuda-graphs "${args[@]}" \
      > /tmp/detail-$c.log 2>&1 || { echo "ncu failed:"; tail -5 /tmp/detail-$c.log; }
    "$ncu" -i /tmp/detail-$c.ncu-rep --page details --print-details all > "$OUT/detail-$c-$DETAIL.txt" 2>&1
    grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Stall|Block Limit|Est. Speedup|Grid Size" "$OUT/detail-$c-$DETAIL.txt" | head -60
    continue
  fi
  PEFTSERVE_PROFILER_RANGE=${RANGE:-decode} timeout 240 "$ncu" --metrics gpu__time_duration.sum --profile-from-start off \
    --launch-skip ${SKIP:-0} --launch-count ${COUNT:-$count} -f -o /tmp/prof-$c "${cli[@]}" bench --model $shape --random-weights --prompt-tokens 128 --max-tokens ${TOKENS:-128} --device cuda --dtype bfloat16 \
    --mode waves --warmup 1 --repeats 1 --no-cuda-graphs "${args[@]}" > /tmp/prof-$c.log 2>&1 || { echo "ncu failed:"; tail -5 /tmp/prof-$c.log; }
  "$ncu" -i /tmp/prof-$c.ncu-rep --csv --page raw --metrics gpu__time_duration.sum > /tmp/prof-$c.csv 2>/dev/null
  python3 loadtests/gpu/kernel_profile.py /tmp/prof-$c.csv "$layers" | tee "$OUT/kernels-$c.txt"
done
