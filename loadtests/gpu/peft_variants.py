# Real Hugging Face PEFT fixtures for every LoRA variant PeftServe serves, and the comparison of PeftServe's
# logits with PEFT's (float32, within 1e-4). Run by loadtests/gpu/peft_variants.sh on the GPU machine (python
# there has torch, transformers and peft); CPU float32 is enough for the tiny model.
#
#   python3 peft_variants.py make TINY_MODEL_DIR WORK   builds the base variants (the tiny Llama, one with a bias on
#       every projection, one with tied embeddings), one PEFT adapter per variant (random weights, saved with
#       save_pretrained), PEFT's logits for WORK/input.safetensors, and WORK/manifest.json
#   python3 peft_variants.py compare WORK               compares WORK/ours/NAME.safetensors (the CLI's `logits`) with
#       PEFT's for every adapter, and WORK/ours/mixed.safetensors (every tiny-base adapter in one batch, row i with
#       adapter i) row by row; prints PASS/FAIL lines; exit code 1 when any fails
import json
import zlib
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

TOL = 1e-4


def load_model(path):
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except TypeError:  # transformers 4 spells it torch_dtype
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def base_variants(tiny, work):
    """The tiny model, and copies with biases on every projection and with tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM
    models = {"tiny": tiny}
    state = load_model(tiny).state_dict()
    g = torch.Generator().manual_seed(1)
    for name, change in (("biased", dict(attention_bias=True, mlp_bias=True)), ("tied", dict(tie_word_embeddings=True))):
        cfg = LlamaConfig.from_pretrained(tiny, **change)
        model = LlamaForCausalLM(cfg).eval()
        own = {k: v for k, v in state.items() if not (name == "tied" and k == "lm_head.weight")}
        missing, _ = model.load_state_dict(own, strict=False)
        with torch.no_grad():
            for key in missing:
                if key.endswith(".bias"):
                    model.state_dict()[key].copy_(0.3 * torch.randn(model.state_dict()[key].shape, generator=g))
        if name == "tied":
            model.tie_weights()
        out = os.path.join(work, "models", name)
        model.save_pretrained(out, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(tiny, f)):
                shutil.copy(os.path.join(tiny, f), out)
        models[name] = out
    return models


# name: (base, LoraConfig arguments). Every adapter starts from random A and B (init_lora_weights=False); the
# parameters that start at the base (magnitudes, biases, saved modules) are then moved off it at random.
VARIANTS = {
    "dora-qv": ("tiny", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "dora-all-rslora": ("tiny", dict(r=4, lora_alpha=8, use_rslora=True, use_dora=True, alpha_pattern={"o_proj": 3},
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "lora-bias": ("tiny", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], lora_bias=True)),
    "bias-lora-only": ("biased", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only")),
    "bias-all": ("biased", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all")),
    "dora-biased": ("biased", dict(r=4, lora_alpha=8, use_dora=True,
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "saved-lm-head": ("tiny", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    "saved-embed": ("tiny", dict(r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["embed_tokens"])),
    "embed-lora": ("tiny", dict(r=4, lora_alpha=8, target_modules=["v_proj", "embed_tokens"])),
    "embed-dora": ("tiny", dict(r=4, lora_alpha=8, target_modules=["o_proj", "embed_tokens"], use_dora=True)),
    "head-lora": ("tiny", dict(r=4, lora_alpha=8, target_modules=["lm_head"])),
    "head-dora": ("tiny", dict(r=4, lora_alpha=8, target_modules=["lm_head", "down_proj"], use_dora=True)),
    "tied-saved-embed": ("tied", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    "tied-saved-embed-kept": ("tied", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True)),
    "tied-embed-lora": ("tied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])),
    "tied-embed-lora-kept": ("tied", dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True)),
}


def make(tiny, work):
    from peft import LoraConfig, get_peft_model
    os.makedirs(work, exist_ok=True)
    models = base_variants(tiny, work)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 384, (2, 12), generator=g)
    save_file({"input_ids": ids}, os.path.join(work, "input.safetensors"))
    manifest = []
    for name, (base_name, args) in VARIANTS.items():
        torch.manual_seed(zlib.crc32(name.encode()))
        base = load_model(models[base_name])
        try:
            model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **args)).eval()
        except (ValueError, TypeError) as e:
            print(f"{name}: PEFT refused the config ({e}); skipped")
            continue
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                if "lora_embedding" in pname:
                    p.mul_(0.3)                                   # PEFT's random init of an embedding LoRA is N(0, 1)
                elif "lora_magnitude_vector" in pname:
                    p.mul_(1 + 0.3 * torch.randn(p.shape))
                elif "modules_to_save" in pname or pname.endswith("bias"):
                    p.add_(0.3 * torch.randn(p.shape))
        out = os.path.join(work, "adapters", name)
        model.save_pretrained(out)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        expected = os.path.join(work, "peft", name + ".safetensors")
        os.makedirs(os.path.dirname(expected), exist_ok=True)
        save_file({"logits": logits.contiguous()}, expected)
        keys = sorted(load_file(os.path.join(out, "adapter_model.safetensors")).keys())
        manifest.append(dict(name=name, model=models[base_name], adapter=out, expected=expected, base=base_name, tensors=len(keys)))
        print(f"{name}: base {base_name}, {len(keys)} tensors ({', '.join(sorted({k.split('.')[-1] if k.split('.')[-1] != 'weight' else '.'.join(k.split('.')[-2:]) for k in keys}))})")
    tiny_adapters = [m for m in manifest if m["base"] == "tiny"]
    mixed = torch.stack([ids[i % 2] for i in range(len(tiny_adapters))])
    save_file({"input_ids": mixed}, os.path.join(work, "mixed_input.safetensors"))
    with open(os.path.join(work, "manifest.json"), "w") as f:
        json.dump(dict(variants=manifest, mixed=[m["name"] for m in tiny_adapters], tiny=tiny), f, indent=1)


def compare(work):
    with open(os.path.join(work, "manifest.json")) as f:
        manifest = json.load(f)
    failed = False
    by_name = {m["name"]: m for m in manifest["variants"]}
    for m in manifest["variants"]:
        ours_path = os.path.join(work, "ours", m["name"] + ".safetensors")
        if not os.path.exists(ours_path):
            print(f"{m['name']}: no logits from PeftServe (see the CLI's error above) FAIL")
            failed = True
            continue
        expected = load_file(m["expected"])["logits"]
        base = load_file(os.path.join(work, "ours", "base-" + m["base"] + ".safetensors"))["logits"] if os.path.exists(
            os.path.join(work, "ours", "base-" + m["base"] + ".safetensors")) else None
        diff = (expected - load_file(ours_path)["logits"]).abs().max().item()
        moved = (expected - base).abs().max().item() if base is not None else float("nan")
        ok = diff <= TOL
        failed |= not ok
        print(f"{m['name']}: max|diff| {diff:.3g} (the adapter moves the base logits by {moved:.3g}) {'PASS' if ok else 'FAIL'}")
    mixed_path = os.path.join(work, "ours", "mixed.safetensors")
    if os.path.exists(mixed_path):
        ours = load_file(mixed_path)["logits"]
        worst = 0.0
        for i, name in enumerate(manifest["mixed"]):
            expected = load_file(by_name[name]["expected"])["logits"][i % 2]
            worst = max(worst, (expected - ours[i]).abs().max().item())
        ok = worst <= TOL
        failed |= not ok
        print(f"mixed batch of {len(manifest['mixed'])} variants, row i with adapter i: max|diff| {worst:.3g} {'PASS' if ok else 'FAIL'}")
    else:
        print("mixed batch: no logits from PeftServe FAIL")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2]))
    else:
        sys.exit(f"unknown command {sys.argv[1]} (make, compare)")
