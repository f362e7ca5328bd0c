#!/usr/bin/env bash
# Trainer checks for the GPU machine (python there has torch, transformers and peft), from the repo
# root with the CLI bundled in .gpu/ (as for run-all.sh: bash loadtests/gpu/pack.sh).
#   bash loadtests/gpu/peft_roundtrip.sh [roundtrip] [llama]
# roundtrip: LoRA, prefix and prompt-tuning adapters trained here on the default model load in Hugging
#            Face PEFT and give the same logits there as here (float32, within 1e-4).
# llama:     real LoRA and QLoRA runs on a Llama-shaped model (Llama-3.2-1B dimensions, random bf16
#            weights, the default tokenizer), on CUDA in bfloat16: tokens/s and peak GPU memory.
# Figures land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
sections=${*:-roundtrip llama}
has() { [[ " $sections " == *" $1 "* ]]; }
cli() { bash .gpu/run.sh dotnet .gpu/app/PeftServe.Cli.dll "$@"; }
model=src/PeftServe.Core/DefaultModel; data=adapters/training-data/tiny-mixed.jsonl; work=/tmp/roundtrip
mkdir -p $work

if has roundtrip; then
  python3 -c "
import torch; from safetensors.torch import save_file
g = torch.Generator().manual_seed(0)
save_file({'input_ids': torch.randint(3, 384, (2, 12), generator=g)}, '$work/input.safetensors')"
  args=()
  for m in lora prefix prompt; do
    cli train --method $m --model $model --data $data --output $work/trained-$m --max-steps 100 --device cpu --no-plot >/dev/null 2>&1 \
      || { echo "training $m failed"; continue; }
    cli logits --model $model --input $work/input.safetensors --output $work/ours-$m.safetensors --adapters $work/trained-$m 2>/dev/null
    args+=("$work/trained-$m" "$work/ours-$m.safetensors")
  done
  python3 loadtests/gpu/peft_roundtrip.py $model $work/input.safetensors "${args[@]}" 2>&1 | grep -v -i warn | tee "$OUT/peft-roundtrip.txt"
fi

if has llama; then
  shape=$work/llama-1b-shape
  python3 - "$shape" "$model" <<'PY'
import shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
out, tok = sys.argv[1], sys.argv[2]
cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, rope_theta=500000.0,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"): shutil.copy(f"{tok}/{f}", out)
PY
  python3 -c "
import json, random
random.seed(1); w = 'red green blue cat dog bird sun moon star tree'.split()
with open('$work/long.jsonl', 'w') as f:
    for i in range(400): f.write(json.dumps({'text': ' '.join(random.choice(w) for _ in range(300))}) + '\n')"
  for m in lora qlora; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > $work/mem-$m.txt & smi=$!
    cli train --method $m --model $shape --data $work/long.jsonl --output $work/llama-$m --device cuda --dtype bfloat16 \
      --max-steps 40 --batch-size 8 --max-length 512 --packing --rank 16 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
      --eval-every 20 --save-every 0 --log-every 5 2>&1 | tail -6 | tee "$OUT/train-$m.txt"
    kill $smi
    python3 -c "
import json; l = json.load(open('$work/llama-$m/training_log.json')); h = l['history'][5:]
mem = max(int(x) for x in open('$work/mem-$m.txt') if x.strip())
print(f\"$m: {l['trainable_parameters']:,} trainable ({l['trainable_percent']:.3f}%), {sum(x['TokensPerSecond'] for x in h)/len(h):.0f} tokens/s, peak GPU memory {mem} MiB, loss {l['history'][0]['Loss']:.3f} -> {l['history'][-1]['Loss']:.3f}\")" \
      | tee -a "$OUT/train-llama-summary.txt"
  done
fi
