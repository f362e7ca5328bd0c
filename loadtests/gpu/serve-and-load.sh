#!/usr/bin/env bash
# Server load test on the GPU machine, server and load generator in one command (from the repo root,
# with the server and load generator published for CUDA, e.g.
#   dotnet publish src/PeftServe.Server -c Release -p:TorchBackend=cuda -o .gpu/server
#   dotnet publish loadtests/PeftServe.LoadGen -c Release -o .gpu/loadgen
# and .gpu carried). Starts the server on MODEL (a Hugging Face folder; default: the tiny built-in
# model), then runs the streaming load for the base alone and for 1, 16 and 128 distinct adapters
# (uploaded copies of ADAPTER, which must match MODEL's shapes). Results land in $OUT.
#   MODEL=/models/llama ADAPTER=/adapters/my-lora bash loadtests/gpu/serve-and-load.sh
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PORT=${PORT:-8000}; CLIENTS=${CLIENTS:-128}; REQUESTS=${REQUESTS:-512}; MAX_TOKENS=${MAX_TOKENS:-128}
TRANSPORT=${TRANSPORT:-sse}
MODEL=${MODEL:-}; ADAPTER=${ADAPTER:-adapters/tiny-lora-r4-qv}
run() { if [ -f .gpu/run.sh ]; then bash .gpu/run.sh "$@"; else "$@"; fi; }
store=$(mktemp -d)
server_args=(--urls "http://127.0.0.1:$PORT" --device cuda --adapter-store "$store" --max-batch-size "${MAX_BATCH:-128}" --max-queue-length 4096 --slots-per-method 128)
[ -n "$MODEL" ] && server_args+=(--model "$MODEL")
run dotnet .gpu/server/PeftServe.Server.dll "${server_args[@]}" > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 1; done
curl -fsS "http://127.0.0.1:$PORT/health"; echo
load() { dotnet .gpu/loadgen/PeftServe.LoadGen.dll --url "http://127.0.0.1:$PORT" --transport "$TRANSPORT" --clients "$CLIENTS" \
  --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" "$@"; }
load --requests "$CLIENTS" --label warmup > /dev/null
load --label "gpu-base" --json "$OUT/load-base.json" --plot "$OUT/load-base.png" | tee "$OUT/load-base.txt"
for m in 1 16 128; do
  load --label "gpu-$m-adapters" --upload-copies "$ADAPTER" --adapter-count "$m" --json "$OUT/load-$m.json" --plot "$OUT/load-$m.png" | tee "$OUT/load-$m.txt"
done
curl -fsS "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics.txt"
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
print("| run | req/s | out tok/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms |")
print("| --- | --- | --- | --- | --- |")
for n in ["base", "1", "16", "128"]:
    d = json.load(open(os.path.join(out, f"load-{n}.json")))
    t, i = d["ttft_ms"], d["itl_ms"]
    print(f"| {d['label']} | {d['requests_per_s']} | {d['output_tokens_per_s']} | {t['p50']}/{t['p90']}/{t['p99']} | {i['p50']}/{i['p90']}/{i['p99']} |")
PY
