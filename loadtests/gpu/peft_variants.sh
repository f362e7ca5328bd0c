#!/usr/bin/env bash
# LoRA variants on the GPU machine (python there has torch, transformers and peft), from the repo root, with the CLI
# bundled in .gpu/ (bash loadtests/gpu/pack.sh):
#   bash loadtests/gpu/peft_variants.sh [fixtures] [trained] [bench]
# fixtures: real PEFT adapters of every variant (DoRA, rsLoRA + alpha_pattern, lora_bias, bias lora_only/all, DoRA on a
#           base with biases, saved lm_head / embed_tokens, LoRA and DoRA on embed_tokens and lm_head, tied embeddings
#           with and without ensure_weight_tying) on the tiny Llama and two variants of it; PeftServe's logits (the CLI's
#           `logits`, float32 on CPU) against PEFT's within 1e-4, each alone and the tiny-base ones mixed in one batch.
# trained:  adapters trained here with --use-dora and --modules-to-save load in PEFT with the same logits.
# bench:    what DoRA and a saved lm_head cost against plain LoRA at batch 32 (Llama-2-7B shape, random bf16 weights,
#           decode waves, CUDA graphs): bench-variants-*.json.
# Figures land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
sections=${*:-fixtures trained bench}
has() { [[ " $sections " == *" $1 "* ]]; }
cli() { bash .gpu/run.sh dotnet .gpu/app/PeftServe.Cli.dll "$@"; }
model=src/PeftServe.Core/DefaultModel; work=/tmp/peft-variants; rm -rf $work; mkdir -p $work/ours
status=0

if has fixtures; then
  python3 loadtests/gpu/peft_variants.py make $model $work 2>&1 | grep -v -i warn | tee "$OUT/peft-variants-make.txt"
  for base in tiny biased tied; do
    dir=$model; [ $base != tiny ] && dir=$work/models/$base
    cli logits --model $dir --input $work/input.safetensors --output $work/ours/base-$base.safetensors 2>>"$OUT/peft-variants-cli.txt"
  done
  python3 - $work <<'PY' > $work/runs.txt
import json, sys
m = json.load(open(sys.argv[1] + "/manifest.json"))
for v in m["variants"]: print(v["name"], v["model"], v["adapter"])
print("mixed", m["tiny"], ",".join(next(v["adapter"] for v in m["variants"] if v["name"] == n) for n in m["mixed"]))
PY
  while read -r name dir adapters; do
    input=$work/input.safetensors; [ $name = mixed ] && input=$work/mixed_input.safetensors
    cli logits --model $dir --input $input --output $work/ours/$name.safetensors --adapters $adapters 2>>"$OUT/peft-variants-cli.txt" \
      || echo "$name: the CLI failed: $(tail -1 "$OUT/peft-variants-cli.txt")"
  done < $work/runs.txt
  python3 loadtests/gpu/peft_variants.py compare $work 2>&1 | tee "$OUT/peft-variants.txt" || status=1
fi

if has trained; then
  data=adapters/training-data/tiny-mixed.jsonl
  python3 -c "
import torch; from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
save_file({'input_ids': torch.randint(3, 384, (2, 12), generator=g)}, '$work/trained-input.safetensors')"
  args=()
  for variant in "dora:--use-dora" "saved:--modules-to-save lm_head,embed_tokens" "dora-saved:--use-dora --modules-to-save lm_head"; do
    name=${variant%%:*}; flags=${variant#*:}
    cli train --method lora --model $model --data $data --output $work/trained-$name --max-steps 60 --device cpu --no-plot \
      --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj $flags >/dev/null 2>&1 || { echo "training $name failed"; status=1; continue; }
    cli logits --model $model --input $work/trained-input.safetensors --output $work/ours-trained-$name.safetensors --adapters $work/trained-$name 2>/dev/null
    args+=("$work/trained-$name" "$work/ours-trained-$name.safetensors")
  done
  python3 loadtests/gpu/peft_roundtrip.py $model $work/trained-input.safetensors "${args[@]}" 2>&1 | grep -v -i warn | tee "$OUT/peft-variants-trained.txt" || status=1
fi

if has bench; then
  bash native/build.sh .gpu/native 2>&1 | tail -1
  export PEFTSERVE_NATIVE=$PWD/.gpu/native/libpeftserve_cuda.so PEFTSERVE_KERNEL_CACHE=/tmp/peftserve-kernels
  for methods in lora dora lora-lm-head; do
    cli bench --model loadtests/shapes/llama-2-7b --random-weights --prompt-tokens 128 --max-tokens 128 --device cuda --dtype bfloat16 \
      --mode waves --concurrency 32 --requests 32 --adapters 1,2 --lora-rank 16 --adapter-methods $methods \
      --json "$OUT/bench-variants-$methods.json" 2>&1 | grep -E "^bench:|error" | tee -a "$OUT/bench-variants.txt"
  done
  python3 - "$OUT" <<'PY' | tee "$OUT/bench-variants-summary.txt"
import json, sys
rows = {}
for m in ("lora", "dora", "lora-lm-head"):
    for r in json.load(open(f"{sys.argv[1]}/bench-variants-{m}.json"))["results"]:
        rows[(m, r["adapters"])] = r
for n in (1, 2):
    base = rows[("lora", n)]["decode_tokens_per_second"]
    for m in ("lora", "dora", "lora-lm-head"):
        r = rows[(m, n)]
        print(f"batch 32, {n} adapter(s), {m:13s}: decode {r['decode_tokens_per_second']:8.1f} tok/s ({r['decode_tokens_per_second'] / base:5.3f} of LoRA), "
              f"ITL p50 {r['itl_ms'][0]:.2f} ms, decode {r['decode_mode']}")
PY
fi
exit $status
