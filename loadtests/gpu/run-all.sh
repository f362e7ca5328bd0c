#!/usr/bin/env bash
# One GPU session's measurements, on the GPU machine, from the repo root, with the CLI bundled in .gpu/
# (here: ../shared/gpu/pack.sh src/PeftServe.Cli/PeftServe.Cli.csproj; cp ../shared/bench/hf_peft_baseline.py .gpu/).
# Sections can be chosen:
#   bash loadtests/gpu/run-all.sh [conformance] [base] [lora] [mix] [nf4] [engine] [peer]
# Figures land in $OUT (the device tool brings them back); the tail of the output is a summary.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
sections=${*:-conformance base lora mix nf4 engine peer}
has() { [[ " $sections " == *" $1 "* ]]; }
cli() { bash .gpu/run.sh dotnet .gpu/app/PeftServe.Cli.dll "$@"; }
fx=tests/fixtures; model=src/PeftServe.Core/DefaultModel; shape=loadtests/shapes/llama-2-7b
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if has conformance; then
  python3 -c "
from safetensors.numpy import load_file, save_file
e = load_file('$fx/tiny-llama-expected.safetensors'); save_file({'input_ids': e['input_ids']}, '/tmp/input.safetensors')
print(','.join(str(int(x)) for x in e['prompt_ids'][0]))" > /tmp/prompt.txt
  prompt=$(cat /tmp/prompt.txt)
  store=$fx/tiny-llama-adapters
  for dt in float32 bfloat16; do
    cli logits --model $model --input /tmp/input.safetensors --output /tmp/l.safetensors --device cuda --dtype $dt 2>/dev/null \
      && python3 loadtests/gpu/compare.py $fx/tiny-llama-expected.safetensors logits base /tmp/l.safetensors | sed "s/^/cuda $dt: /"
    ids=$(cli generate --model $model --prompt-ids "$prompt" --greedy --max-tokens 16 --ignore-eos --ids --device cuda --dtype $dt 2>/dev/null)
    python3 loadtests/gpu/compare.py $fx/tiny-llama-expected.safetensors greedy base "$ids" | sed "s/^/cuda $dt: /"
    for a in lora-r8-all prefix-6 prompt-5 ia3 llama-adapter-4x2; do
      cli logits --model $model --input /tmp/input.safetensors --output /tmp/l.safetensors --device cuda --dtype $dt \
        --adapter-store $store --adapters $a 2>/dev/null \
        && python3 loadtests/gpu/compare.py $fx/tiny-llama-expected.safetensors logits $a /tmp/l.safetensors | sed "s/^/cuda $dt: /"
    done
  done 2>&1 | tee "$OUT/conformance.txt"
fi
b7() { cli bench --model $shape --random-weights --prompt-tokens 128 --max-tokens 128 --device cuda --dtype bfloat16 "$@"; }
has base && b7 --mode waves --concurrency 1,16,32 --json "$OUT/bench-base.json" 2>&1 | tail -12 | tee "$OUT/bench-base.txt"
has lora && b7 --mode waves --concurrency 32 --adapters 0,1,8,32 --warmup 1 --json "$OUT/bench-lora.json" 2>&1 | tail -12 | tee "$OUT/bench-lora.txt"
has mix && b7 --mode waves --concurrency 32 --adapters 5 --adapter-methods lora,prefix,prompt,ia3,llama-adapter --json "$OUT/bench-mix.json" 2>&1 | tail -8 | tee "$OUT/bench-mix.txt"
has nf4 && { cli nf4-check 2>&1 | tail -20 | tee "$OUT/nf4-check.txt"; b7 --mode waves --quantize nf4 --concurrency 1,32 --json "$OUT/bench-nf4.json" 2>&1 | tail -10 | tee "$OUT/bench-nf4.txt"; }
# The serving engine (continuous batching, paged KV cache, adapter cache): 1, 16 and 128 distinct LoRAs vs the base, bf16 and NF4.
if has engine; then
  b7 --concurrency 32 --requests 96 --adapters 0,1,16,128 --json "$OUT/bench-engine.json" 2>&1 | tail -14 | tee "$OUT/bench-engine.txt"
  b7 --quantize nf4 --concurrency 32 --requests 96 --adapters 0,16,128 --json "$OUT/bench-engine-nf4.json" 2>&1 | tail -12 | tee "$OUT/bench-engine-nf4.txt"
fi
if has peer; then
  PYTHONUNBUFFERED=1 python3 loadtests/python/hf_decode_bench.py $shape --batch 1 16 32 --json "$OUT/peer-torch.json" 2>&1 | grep -v -i warn | tee "$OUT/peer-torch.txt"
  PYTHONUNBUFFERED=1 timeout 420 python3 .gpu/hf_peft_baseline.py "$OUT/peer-peft.json" 2>&1 | grep -v -i warn | tail -8 | tee "$OUT/peer-peft.txt"
fi
echo "== summary"; cat "$OUT"/conformance.txt "$OUT"/bench-*.txt "$OUT"/peer-*.txt 2>/dev/null | grep -E "cuda|tok/s|^│|^\||python|_tok_s" | tail -60
