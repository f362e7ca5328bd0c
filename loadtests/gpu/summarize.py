# Collects the JSON files run-all.sh leaves in a folder into one markdown table (docs/benchmarks.md's GPU table).
# usage: python3 summarize.py OUT_DIR
import json, os, sys

out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None

rows = []
floor = load("floor.json")
if floor:
    for key, label in [("1", "batch 1, base"), ("32", "batch 32, base"), ("32-lora1", "batch 32, 1 LoRA"), ("32-lora32", "batch 32, 32 LoRAs")]:
        if key in floor:
            rows.append(("python floor (graph)", label, floor[key]["graph_tok_s"], "", ""))
            rows.append(("python floor (eager)", label, floor[key]["eager_tok_s"], "", ""))
for name in ["bench-base1.json", "bench-base.json", "bench-lora.json", "bench-lora128.json", "bench-lora-overlap.json", "bench-lora-serial.json", "bench-mix.json", "bench-lora-separate.json", "bench-mix-separate.json", "bench-nf4-1.json", "bench-nf4-1-tiled.json", "bench-nf4.json", "bench-engine.json",
             "bench-nopdl-base1.json", "bench-nopdl-base.json", "bench-nopdl-lora.json", "bench-nopdl-mix.json", "bench-nopdl-nf4-1.json"]:
    data = load(name)
    if not data:
        continue
    quant = data.get("quantization", "None")
    for r in data["results"]:
        label = f"{r['mode']}, batch {r['concurrency']}, " + ("base" if r["adapters"] == 0 else f"{r['adapters']} adapters ({r['adapter_methods']})")
        if quant != "None":
            label = "NF4 " + label
        if "overlap" in name:
            label += ", LoRA beside the base projection (PEFTSERVE_LORA_OVERLAP=1)"
        if "serial" in name:
            label += ", LoRA shrink after the base projection (PEFTSERVE_LORA_OVERLAP=0)"
        if "separate" in name:
            label += ", output terms in kernels of their own (PEFTSERVE_ROW_EPILOGUE=0)"
        if "-tiled" in name:
            label += ", tiled NF4 GEMV (PEFTSERVE_NF4_GEMV=tiled)"
        if "-nopdl-" in name:
            label += ", without programmatic dependent launch (PEFTSERVE_PDL=0)"
        lo, hi = r.get("decode_range", [0, 0])
        ttft = r["ttft_ms"]
        rows.append(("PeftServe", label, round(r["decode_tokens_per_second"]),
                     f"{lo:.0f}-{hi:.0f} over {r.get('runs', 1)} runs", f"TTFT p50 {ttft[0]:.0f} ms, p99 {ttft[2]:.0f} ms; {r.get('decode_mode', '')}"))
peft = load("peer-peft.json")
if peft:
    for k, v in peft.items():
        rows.append(("HF transformers + PEFT", k, round(v, 1), "", ""))
print("| who | what | decode tok/s | spread | notes |")
print("| --- | --- | ---: | --- | --- |")
for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")
