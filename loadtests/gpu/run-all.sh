#!/usr/bin/env bash
# One GPU session's checks and measurements, on the GPU machine, from the repo root, with the CLI bundled in
# .gpu/ (made here with: bash loadtests/gpu/pack.sh).
#   bash loadtests/gpu/run-all.sh [selfcheck] [floor] [base] [lora] [lora-serial] [mix] [separate] [nf4-tune] [nf4] [engine] [peft] [nopdl] [sass]
# sass: last, registers and loads in flight of the adapter-term kernels as NVRTC compiled them for the sections before
# (sass-report.sh on the kernel cache; nothing to show if no section ran a kernel).
# nf4-tune: times the tensor-core NF4 kernel's settings (nf4-check, 32 rows; TUNE_MT, TUNE_XSMEM, TUNE_PREFETCH, TUNE_BLOCKS
# choose which) and exports the fastest for the nf4 section.
# separate: 32 LoRAs and the mix with every method's output terms in kernels of their own (PEFTSERVE_ROW_EPILOGUE=0:
# no shared epilogue, nothing left to the residual add + RMSNorm), to compare with the same call's lora and mix.
# nopdl: the selfcheck again and batch 1, batch 32, 32 LoRAs, the mix and NF4 batch 1 without programmatic dependent
# launch (PEFTSERVE_PDL=0; on by default), to set beside the same call's figures with it.
# Builds the native helper (CUDA graphs) first, against the machine's own libtorch. Figures land in $OUT
# (the device tool brings them back); the tail of the output is the summary table (loadtests/gpu/summarize.py).
set -uo pipefail
# Everything is written to RES; at the end it is packed into $OUT/results.tgz beside the summary (the device
# tool brings back only a few files).
FINAL=${OUT:-/tmp/out}; OUT=${RES:-/tmp/peftserve-results}; mkdir -p "$FINAL" "$OUT"
sections=${*:-selfcheck floor base lora mix nf4 engine}
has() { [[ " $sections " == *" $1 "* ]]; }
export PEFTSERVE_KERNEL_CACHE=/tmp/peftserve-kernels
cli() { bash .gpu/run.sh dotnet .gpu/app/PeftServe.Cli.dll "$@"; }
shape=loadtests/shapes/llama-2-7b
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
# Each section's start also packs what the earlier ones left, so a run cut short still brings its figures back.
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; tar czf "$FINAL/results.tgz" -C "$OUT" . 2>/dev/null; }

stamp "native helper"
bash native/build.sh .gpu/native 2>&1 | tail -3
export PEFTSERVE_NATIVE=$PWD/.gpu/native/libpeftserve_cuda.so

if has selfcheck; then
  stamp "selfcheck"
  cli selfcheck --fixtures tests/fixtures > "$OUT/selfcheck.txt" 2>&1
  grep -c ^PASS "$OUT/selfcheck.txt" | sed 's/^/selfcheck PASS lines: /'; grep -E "^FAIL|selfcheck:" "$OUT/selfcheck.txt" | head -40
fi
# The python floor: a minimal decoder, eager and CUDA-graphed, with per-row gathered LoRAs.
has floor && { stamp "graph floor"; PYTHONUNBUFFERED=1 timeout 240 python3 .gpu/graph_floor.py "$OUT/floor.json" 2>&1 | grep -v -i warn | tail -8; }
b7() { cli bench --model $shape --random-weights --prompt-tokens 128 --max-tokens 128 --device cuda --dtype bfloat16 ${BENCH_ARGS:-} "$@"; }
if has base; then
  stamp "base"
  PEFTSERVE_PROFILE=1 b7 --mode waves --concurrency 1 --requests 4 --json "$OUT/bench-base1.json" 2>&1 | grep -E "^bench:|error|^profile" | tail -4 | tee "$OUT/bench-base.txt"
  b7 --mode waves --concurrency 32 --requests 32 --json "$OUT/bench-base.json" 2>&1 | grep -E "^bench:|error" | tee -a "$OUT/bench-base.txt"
fi
if has lora; then
  stamp "lora"
  b7 --mode waves --concurrency 32 --adapters 0,1,32 --requests 32 --json "$OUT/bench-lora.json" 2>&1 | grep -E "^bench:|error" | tee "$OUT/bench-lora.txt"
  # LORA128=0 leaves out 128 LoRAs through 64 slots (the longest case here, about 90 s).
  [ "${LORA128:-1}" != 0 ] && b7 --mode waves --concurrency 32 --adapters 128 --requests 96 --json "$OUT/bench-lora128.json" 2>&1 | grep -E "^bench:|error" | tee -a "$OUT/bench-lora.txt"
fi
if has lora-serial; then
  stamp "lora, the shrink after the base projection (PEFTSERVE_LORA_OVERLAP=0)"
  PEFTSERVE_LORA_OVERLAP=0 b7 --mode waves --concurrency 32 --adapters 1,32 --requests 32 --json "$OUT/bench-lora-serial.json" 2>&1 | grep -E "^bench:|error" | tee "$OUT/bench-lora-serial.txt"
fi
if has mix; then
  stamp "mix"
  b7 --mode waves --concurrency 32 --adapters ${MIX_ADAPTERS:-0,9} --requests 32 --adapter-methods lora,prefix,prompt,ptuning,ia3,llama-adapter,bottleneck,adamix,bitfit \
    --json "$OUT/bench-mix.json" 2>&1 | grep -E "^bench:|error" | tee "$OUT/bench-mix.txt"
fi
if has separate; then
  stamp "32 LoRAs and the mix, every method's output terms in kernels of their own (PEFTSERVE_ROW_EPILOGUE=0)"
  PEFTSERVE_ROW_EPILOGUE=0 b7 --mode waves --concurrency 32 --adapters 32 --requests 32 --json "$OUT/bench-lora-separate.json" 2>&1 | grep -E "^bench:|error" | tee "$OUT/bench-separate.txt"
  PEFTSERVE_ROW_EPILOGUE=0 b7 --mode waves --concurrency 32 --adapters ${MIX_ADAPTERS:-0,9} --requests 32 \
    --adapter-methods lora,prefix,prompt,ptuning,ia3,llama-adapter,bottleneck,adamix,bitfit --json "$OUT/bench-mix-separate.json" 2>&1 | grep -E "^bench:|error" | tee -a "$OUT/bench-separate.txt"
fi
if has nf4-tune; then
  stamp "nf4 tensor-core kernel settings (nf4-check, 32 rows)"
  # Each setting times the kernel on the four 7B shapes; the one with the least time per decoder layer (q|k|v, o, gate and
  # up as two 11008x4096, down) is exported for the nf4 section below, and the table kept in nf4-tune.txt.
  : > "$OUT/nf4-tune.txt"
  for mt in ${TUNE_MT:-1}; do for xsmem in ${TUNE_XSMEM:-1}; do for depth in ${TUNE_PREFETCH:-2 3}; do for blocks in ${TUNE_BLOCKS:-198 264 396}; do
    setting="PEFTSERVE_NF4_MMA_MT=$mt PEFTSERVE_NF4_MMA_XSMEM=$xsmem PEFTSERVE_NF4_MMA_PREFETCH=$depth PEFTSERVE_NF4_MMA_BLOCKS=$blocks"
    echo "== $setting" >> "$OUT/nf4-tune.txt"
    env $setting timeout 60 bash .gpu/run.sh dotnet .gpu/app/PeftServe.Cli.dll nf4-check --rows 32 --bf16-only --iterations ${TUNE_ITERATIONS:-30} \
      >> "$OUT/nf4-tune.txt" 2>&1
  done; done; done; done
  best=$(python3 - "$OUT/nf4-tune.txt" 2>>"$OUT/nf4-tune.txt" <<'PY'
import sys
weight = {"12288x4096": 1, "4096x4096": 1, "11008x4096": 2, "4096x11008": 1}
best, setting, totals, passed = None, None, {}, {}
for line in open(sys.argv[1]):
    if line.startswith("== "): setting = line[3:].strip(); totals[setting] = 0.0; passed[setting] = 0; continue
    f = line.split()
    if setting and len(f) > 7 and f[0] == "bf16" and f[1] in weight and f[-1] == "ok":
        totals[setting] += weight[f[1]] * float(f[6]); passed[setting] += 1
for s, t in totals.items():   # a setting counts only if every shape passed
    print(f"{s}: {t:.1f} us per layer, {passed[s]} of {len(weight)} shapes passed", file=sys.stderr)
    if passed[s] == len(weight) and (best is None or t < totals[best]): best = s
print(best or "")
PY
)
  grep "us per layer" "$OUT/nf4-tune.txt"
  echo "nf4-tune: best $best" | tee -a "$OUT/nf4-tune.txt"
  [ -n "$best" ] && export $best
fi
if has nf4; then
  stamp "nf4"
  PEFTSERVE_PROFILE=1 b7 --mode waves --quantize nf4 --concurrency 1 --requests 4 --json "$OUT/bench-nf4-1.json" 2>&1 | grep -E "^bench:|error|^profile" | tail -4 | tee "$OUT/bench-nf4.txt"
  b7 --mode waves --quantize nf4 --concurrency 32 --requests 32 --json "$OUT/bench-nf4.json" 2>&1 | grep -E "^bench:|error|weights" | tee -a "$OUT/bench-nf4.txt"
fi
if has engine; then
  stamp "engine"
  b7 --concurrency 32 --requests ${ENGINE_REQUESTS:-128} --adapters 0,128 --json "$OUT/bench-engine.json" 2>&1 | grep -E "^bench:|error" | tee "$OUT/bench-engine.txt"
fi
if has peft; then
  stamp "hf peft"
  # PEFT_TOKENS shortens the peer's generations (128 new tokens take minutes at its 32-adapter speed).
  sed "s/B, P, N = 32, 128, 128/B, P, N = 32, 128, ${PEFT_TOKENS:-128}/" .gpu/hf_peft_baseline.py > /tmp/hf_peft_baseline.py
  PYTHONUNBUFFERED=1 timeout 420 python3 /tmp/hf_peft_baseline.py "$OUT/peer-peft.json" 2>&1 | grep -v -i warn | tail -8
fi
if has nopdl; then
  stamp "without programmatic dependent launch (PEFTSERVE_PDL=0)"
  export PEFTSERVE_PDL=0
  cli selfcheck --fixtures tests/fixtures > "$OUT/selfcheck-nopdl.txt" 2>&1
  grep -c ^PASS "$OUT/selfcheck-nopdl.txt" | sed 's/^/selfcheck (no PDL) PASS lines: /'; grep -E "^FAIL|^kernels:|selfcheck:" "$OUT/selfcheck-nopdl.txt" | head -20
  b7 --mode waves --concurrency 1 --requests 4 --json "$OUT/bench-nopdl-base1.json" 2>&1 | grep -E "^bench:|error" | tee "$OUT/bench-nopdl.txt"
  b7 --mode waves --concurrency 32 --requests 32 --json "$OUT/bench-nopdl-base.json" 2>&1 | grep -E "^bench:|error" | tee -a "$OUT/bench-nopdl.txt"
  b7 --mode waves --concurrency 32 --adapters 32 --requests 32 --json "$OUT/bench-nopdl-lora.json" 2>&1 | grep -E "^bench:|error" | tee -a "$OUT/bench-nopdl.txt"
  b7 --mode waves --concurrency 32 --adapters ${MIX_ADAPTERS:-0,9} --requests 32 --adapter-methods lora,prefix,prompt,ptuning,ia3,llama-adapter,bottleneck,adamix,bitfit \
    --json "$OUT/bench-nopdl-mix.json" 2>&1 | grep -E "^bench:|error" | tee -a "$OUT/bench-nopdl.txt"
  b7 --mode waves --quantize nf4 --concurrency 1 --requests 4 --json "$OUT/bench-nopdl-nf4-1.json" 2>&1 | grep -E "^bench:|error" | tee -a "$OUT/bench-nopdl.txt"
  unset PEFTSERVE_PDL
fi
if has sass; then
  stamp "sass: registers and loads in flight of the kernels that add adapter terms (as the sections before compiled them)"
  cuobj=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
  for bin in "$PEFTSERVE_KERNEL_CACHE"/*.bin; do
    lines=$(bash loadtests/gpu/sass-report.sh "$cuobj" "$bin" \
      'bgmv_expand|row_epilogue|add_rms_norm|silu_mul_terms|rope_write_kv|bgmv_shrink|paged_decode_attention|nf4_mma_bf16_n4' 2>/dev/null)
    [ -n "$lines" ] && printf '%s\n%s\n' "$(basename "$bin")" "$lines"
  done | tee "$OUT/sass.txt"
fi
stamp "done"
python3 loadtests/gpu/summarize.py "$OUT" | tee "$OUT/summary.md"
cp "$OUT/summary.md" "$FINAL/"; for f in selfcheck.txt selfcheck-nopdl.txt sass.txt; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL/"; done
tar czf "$FINAL/results.tgz" -C "$OUT" .
