# The peer for `peftserve bench`: the same Llama forward in python (PyTorch + Hugging Face transformers,
# eager attention through SDPA) with random weights of a given config.json shape, timing a batched
# prefill and then token-by-token greedy decode through the KV cache, exactly the work `bench` times.
# usage: python3 hf_decode_bench.py CONFIG_DIR --batch 1 16 --prompt-tokens 128 --max-tokens 128 [--json OUT]
import argparse, json, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("config_dir")
ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
ap.add_argument("--prompt-tokens", type=int, default=128)
ap.add_argument("--max-tokens", type=int, default=128)
ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--json")
a = ap.parse_args()

dtype = getattr(torch, a.dtype)
cfg = AutoConfig.from_pretrained(a.config_dir)
torch.manual_seed(0)
torch.set_default_dtype(dtype)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype).eval()
torch.set_default_dtype(torch.float32)

@torch.inference_mode()
def run(batch):
    ids = torch.randint(3, cfg.vocab_size, (batch, a.prompt_tokens), device="cuda")
    torch.cuda.synchronize(); t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    nxt.cpu(); t1 = time.perf_counter()
    for _ in range(a.max_tokens - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        nxt.cpu()  # one host sync per step, as a server must do to stream tokens
    t2 = time.perf_counter()
    return {"batch": batch, "ttft_ms": (t1 - t0) * 1e3, "decode_tokens_per_s": batch * (a.max_tokens - 1) / (t2 - t1),
            "itl_ms": (t2 - t1) / (a.max_tokens - 1) * 1e3}

results = []
for b in a.batch:
    run(b)  # warm-up
    r = run(b); results.append(r)
    print(f"python torch {torch.__version__} transformers: batch {b}: decode {r['decode_tokens_per_s']:.1f} tok/s, "
          f"step {r['itl_ms']:.2f} ms, prefill {r['ttft_ms']:.1f} ms", flush=True)
if a.json: json.dump(results, open(a.json, "w"), indent=1)
