#!/usr/bin/env bash
# Trains the example adapters of adapters/ with the trainer (default model, seed 42).
set -euo pipefail
cd "$(dirname "$0")/.."
T="dotnet src/PeftServe.Trainer/bin/Release/net10.0/PeftServe.Trainer.dll"
for m in lora qlora prefix prompt ptuning ia3 llama-adapter bottleneck adamix bitfit; do
  extra=()
  case $m in
    lora|qlora) extra=(--rank 4 --lora-targets q_proj,k_proj,v_proj,o_proj) ;;
    prompt) extra=(--prompt-init-text "The animal is") ;;
  esac
  $T --method $m --data adapters/training-data/tiny-mixed.jsonl --output adapters/trained-$m --max-steps 200 --eval-every 50 --save-every 0 --seed 42 "${extra[@]}" 2>&1 | tail -2
  rm -rf adapters/trained-$m/checkpoints
done
