#!/usr/bin/env bash
# The trainer's memory and speed beside Hugging Face transformers + PEFT, on the GPU machine, in one call
# (about 5 minutes on an H200). How to run it:
#   here, from the repo root:   bash loadtests/gpu/pack.sh
#   on the GPU machine (carry .gpu), from the repo root:   bash loadtests/gpu/train-memory.sh
# Figures land in $OUT: train-memory.md (the table for docs/benchmarks.md), train-memory.json, one log per run.
#
# Shapes: the peer's Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 KV heads,
# intermediate 8192; its vocabulary of 32,000 untied, as hf_peft_train.py builds it), random bf16
# weights, batch 8 x 512 tokens, LoRA rank 16 / alpha 32 on all seven linears, AdamW lr 5e-4
# (weight decay 0.01, torch's default), 40 steps, tokens/s over steps 6..40 as the peer counts them.
# PeftServe: lora, qlora, each also with --gradient-checkpointing; then QLoRA + checkpointing on the
# Llama-2-7B shape at batch 4 x 512, and LoRA + checkpointing on the real Llama-3.2-1B shape (vocabulary
# 128,256, tied embeddings) where the chunked loss matters most.
# Memory, the same way on both sides: the device's used memory sampled by nvidia-smi every 100 ms
# during the run, peak minus the idle reading before it (so it includes the CUDA context and whatever
# the caching allocator holds). Each configuration runs in a process of its own (the peer's loop is
# run once per configuration). Also recorded: the peer's own allocator peaks
# (torch.cuda.max_memory_reserved/allocated) and PeftServe's cuMemGetInfo reading after its steps.
#
# Knobs: STEPS (40), PEER (.gpu/hf_peft_train.py), SKIP_PEER=1, SKIP_7B=1, and SMOKE=1, which runs the
# PeftServe half on the CPU on the tiny default shape with the local build (for checking this script).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
work=${WORK:-/tmp/train-memory}; rm -rf "$work"; mkdir -p "$work"
STEPS=${STEPS:-40}; SMOKE=${SMOKE:-0}
PEER=${PEER:-.gpu/hf_peft_train.py}
[ -f "$PEER" ] || PEER=../shared/bench/hf_peft_train.py
targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj

if [ "$SMOKE" = 1 ]; then
  cli() { dotnet src/PeftServe.Cli/bin/Release/net10.0/PeftServe.Cli.dll "$@"; }
  device=(--device cpu --dtype float32); SKIP_PEER=1; SKIP_7B=1; batch=2; length=64
  shape1b=src/PeftServe.Core/DefaultModel; shape_real=src/PeftServe.Core/DefaultModel
  mem_start() { :; }; mem_stop() { echo 0; }
else
  cli() { bash .gpu/run.sh dotnet .gpu/app/PeftServe.Cli.dll "$@"; }
  device=(--device cuda --dtype bfloat16); batch=8; length=512
  shape1b=$work/llama-3.2-1b-peer; shape_real=loadtests/shapes/llama-3.2-1b
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  # mem_start FILE: idle reading, then samples in the background; mem_stop FILE: peak minus idle (MiB).
  mem_start() {
    nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits > "$1.idle"
    nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$1" & sampler=$!
  }
  mem_stop() {
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    python3 -c "import sys; v=[int(x) for x in open('$1') if x.strip().isdigit()]; i=int(open('$1.idle').read().strip()); print(max(v)-i if v else 0)"
  }
  # The peer's shape: Llama-3.2-1B's decoder with hf_peft_train.py's 32,000-word untied vocabulary and plain rope.
  mkdir -p "$shape1b"
  python3 - loadtests/shapes/llama-3.2-1b/config.json "$shape1b/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
c.pop("rope_scaling")
json.dump(c, open(sys.argv[2], "w"), indent=1)
PY
fi

# Text that packs into full blocks: random words of the built-in tokenizer's small vocabulary.
python3 -c "
import json, random
random.seed(1); w = 'red green blue cat dog bird sun moon star tree'.split()
with open('$work/long.jsonl', 'w') as f:
    for i in range(400): f.write(json.dumps({'text': ' '.join(random.choice(w) for _ in range(300))}) + '\n')"

results=$work/results.jsonl; : > "$results"

# ours NAME METHOD SHAPE BATCH STEPS [extra train flags...]
ours() {
  local name=$1 method=$2 shape=$3 b=$4 steps=$5; shift 5
  echo "== PeftServe $name" >&2
  mem_start "$work/mem-$name.txt"
  cli train --method "$method" --model "$shape" --random-weights --data "$work/long.jsonl" --output "$work/$name" "${device[@]}" \
    --max-steps "$steps" --batch-size "$b" --max-length "$length" --packing --val-fraction 0 --eval-every 0 --save-every 0 \
    --rank 16 --lora-alpha 32 --lora-targets $targets --lr 5e-4 --schedule constant --warmup-steps 0 --weight-decay 0.01 \
    --max-grad-norm 0 --no-plot --log-every 10 "$@" > "$OUT/train-$name.log" 2>&1
  local rc=$? mib; mib=$(mem_stop "$work/mem-$name.txt")
  tail -3 "$OUT/train-$name.log" >&2
  python3 - "$work/$name/training_log.json" "$name" "$rc" "$mib" "$b" "$length" >> "$results" <<'PY'
import json, sys
path, name, rc, mib, b, length = sys.argv[1:]
row = dict(side="PeftServe", name=name, batch=f"{b} x {length}", exit_code=int(rc), sampled_peak_mib=int(mib))
try:
    log = json.load(open(path))
    h = log["history"][5:] or log["history"]
    row.update(tokens_per_s=round(sum(x["Tokens"] for x in h) / sum(x["Tokens"] / x["TokensPerSecond"] for x in h)),
               used_after_steps_mib=round(log["peak_memory_bytes"] / 2**20), base=log["base_format"],
               checkpointing=log["gradient_checkpointing"], trainable=log["trainable_parameters"],
               first_loss=round(log["history"][0]["Loss"], 3), final_loss=round(log["history"][-1]["Loss"], 3))
except (OSError, KeyError, ValueError, ZeroDivisionError) as e:
    row["error"] = f"no training log ({e})"
print(json.dumps(row))
PY
}

# peer CKPT: hf_peft_train.py's loop for one configuration (False or True), in a process of its own.
peer() {
  local ckpt=$1 name; name=$([ "$1" = True ] && echo peft-lora-ckpt || echo peft-lora)
  echo "== peer $name" >&2
  mem_start "$work/mem-$name.txt"
  python3 - "$PEER" "$ckpt" "$work/$name.json" > "$OUT/$name.log" 2>&1 <<'PY'
import sys
script, ckpt, out = sys.argv[1:]
src = open(script).read()
loop = "for ckpt in (False, True):"
assert loop in src, "hf_peft_train.py no longer has its two-configuration loop"
sys.argv = [script, out]
exec(compile(src.replace(loop, f"for ckpt in ({ckpt},):"), script, "exec"), {"__name__": "__main__"})
PY
  local rc=$? mib; mib=$(mem_stop "$work/mem-$name.txt")
  tail -2 "$OUT/$name.log" >&2
  python3 - "$work/$name.json" "$name" "$rc" "$mib" >> "$results" <<'PY'
import json, sys
path, name, rc, mib = sys.argv[1:]
row = dict(side="HF transformers + PEFT", name=name, batch="8 x 512", exit_code=int(rc), sampled_peak_mib=int(mib))
try:
    r = next(iter(json.load(open(path)).values()))
    row.update(tokens_per_s=r["tokens_per_s"], allocator_peak_reserved_mib=r["peak_reserved_mib"],
               allocator_peak_allocated_mib=r["peak_allocated_mib"], final_loss=r["final_loss"], checkpointing=name.endswith("ckpt"))
except (OSError, KeyError, ValueError, StopIteration) as e:
    row["error"] = f"no peer result ({e})"
print(json.dumps(row))
PY
}

if [ "${SKIP_PEER:-0}" != 1 ]; then peer False; peer True; fi
ours lora lora "$shape1b" $batch "$STEPS"
ours qlora qlora "$shape1b" $batch "$STEPS"
ours lora-ckpt lora "$shape1b" $batch "$STEPS" --gradient-checkpointing
ours qlora-ckpt qlora "$shape1b" $batch "$STEPS" --gradient-checkpointing
[ "${SKIP_7B:-0}" != 1 ] && ours 7b-qlora-ckpt qlora loadtests/shapes/llama-2-7b 4 20 --gradient-checkpointing
ours real-1b-lora-ckpt lora "$shape_real" $batch 20 --gradient-checkpointing

python3 - "$results" "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump(rows, open(f"{sys.argv[2]}/train-memory.json", "w"), indent=1)
label = {"peft-lora": "HF transformers + PEFT LoRA", "peft-lora-ckpt": "HF + PEFT LoRA, gradient checkpointing",
         "lora": "PeftServe `train --method lora`", "qlora": "PeftServe `train --method qlora`",
         "lora-ckpt": "PeftServe lora `--gradient-checkpointing`", "qlora-ckpt": "PeftServe qlora `--gradient-checkpointing`",
         "7b-qlora-ckpt": "PeftServe qlora `--gradient-checkpointing`, Llama-2-7B shape",
         "real-1b-lora-ckpt": "PeftServe lora `--gradient-checkpointing`, real Llama-3.2-1B shape (vocab 128,256, tied)"}
def mib(x): return "" if x is None else f"{x / 1024:.2f} GiB"
lines = ["| run | batch | tokens/s | peak device memory (nvidia-smi, sampled) | allocator / driver reading | final loss |",
         "| --- | --- | ---: | ---: | --- | ---: |"]
for r in rows:
    if "error" in r or r["exit_code"] != 0:
        lines.append(f"| {label.get(r['name'], r['name'])} | {r['batch']} | failed (exit {r['exit_code']}) | | {r.get('error', '')} | |")
        continue
    extra = (f"peak reserved {mib(r['allocator_peak_reserved_mib'])}, allocated {mib(r['allocator_peak_allocated_mib'])}"
             if "allocator_peak_reserved_mib" in r else f"used after steps (cuMemGetInfo) {mib(r['used_after_steps_mib'])}")
    lines.append(f"| {label.get(r['name'], r['name'])} | {r['batch']} | {r['tokens_per_s']:,} | {mib(r['sampled_peak_mib'])} | {extra} | {r['final_loss']} |")
open(f"{sys.argv[2]}/train-memory.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
