# Loads adapters trained by PeftServe's trainer in Hugging Face PEFT and compares PEFT's logits with
# PeftServe's (written by the CLI's `logits` verb for the same input ids), in float32.
# usage: python3 peft_roundtrip.py MODEL_DIR INPUT.safetensors ADAPTER_DIR OURS.safetensors [ADAPTER_DIR OURS.safetensors ...]
# Prints one line per adapter: max |diff| and PASS when it is within 1e-4. Exit code 1 when any fails.
import sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel

model_dir, input_path, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
ids = load_file(input_path)["input_ids"].long()
failed = False
for adapter_dir, ours_path in zip(pairs[::2], pairs[1::2]):
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    out = out[:, -ids.shape[1]:, :]  # prompt-type methods return the virtual columns too
    ours = load_file(ours_path)["logits"].float()
    diff = (out - ours).abs().max().item()
    ok = diff <= 1e-4
    failed |= not ok
    print(f"{adapter_dir}: {model.peft_config['default'].peft_type} logits {tuple(out.shape)} max|diff| {diff:.3g} {'PASS' if ok else 'FAIL'}")
sys.exit(1 if failed else 0)
