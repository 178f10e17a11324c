#!/usr/bin/env bash
# The main job on the embedded default: tiny offline model, synthetic adapters, compress, serve.
#   DEMO_PORT (8000)            port of the server
#   DEMO_SERVE_SECONDS (forever) how long to keep serving after the sample request; 0 = stop at once
set -euo pipefail
OUT=${1:-demo_out}
BIN=.venv/bin
PORT=${DEMO_PORT:-8000}
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
rm -rf "$OUT"
mkdir -p "$OUT"
echo "== 1. a tiny Llama (hidden 256, 2 layers, random weights) and 300 synthetic rank-8 PEFT adapters on q/k/v/o"
$BIN/python scripts/make_tiny_model.py "$OUT/model"
$BIN/python scripts/make_adapters.py "$OUT/adapters" --n 300 --layers 2 --hidden 256 --kv-dim 128 --rank 8 \
    --targets q_proj,k_proj,v_proj,o_proj --structure shared --seed 0
$BIN/python scripts/make_adapters.py "$OUT/late" --n 1 --layers 2 --hidden 256 --kv-dim 128 --rank 8 \
    --targets q_proj,k_proj,v_proj,o_proj --structure random --seed 7
echo "== 2. compress: JD-Full, rank and clusters chosen automatically (mean error < 0.5)"
$BIN/vllm-jd compress "$OUT/adapters" --out "$OUT/store"
echo "== 3. add a new, unrelated adapter: too far from every cluster, so it is kept exact"
mv "$OUT/late/adapter-0000" "$OUT/late/newcomer"
$BIN/vllm-jd add "$OUT/store" "$OUT/late/newcomer"
echo "== 4. inspect"
$BIN/vllm-jd inspect "$OUT/store" | head -8
echo "== 5. export one adapter back to a standard PEFT adapter"
$BIN/vllm-jd export "$OUT/store" adapter-0042 --out "$OUT/exported/adapter-0042"
echo "== 6. serve every adapter through vLLM's OpenAI server (log: $OUT/server.log)"
$BIN/vllm-jd serve "$OUT/model" --jd-store "$OUT/store" --host 127.0.0.1 --port "$PORT" --max-model-len 512 \
    > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "server failed to start:"; tail -30 "$OUT/server.log"; exit 1; }
    sleep 1
done
REQUEST='{"model": "adapter-0042", "prompt": "def hello(", "max_tokens": 12, "temperature": 0}'
echo "models served: $(curl -s "http://127.0.0.1:$PORT/v1/models" | $BIN/python -c 'import json,sys; print(len(json.load(sys.stdin)["data"]))')"
echo "sample request (adapter-0042):"
curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' -d "$REQUEST"
echo
echo "repeat it with:"
echo "  curl -s http://127.0.0.1:$PORT/v1/completions -H 'Content-Type: application/json' -d '$REQUEST'"
if [ "${DEMO_SERVE_SECONDS:-}" = "0" ]; then exit 0; fi
echo "serving on http://127.0.0.1:$PORT (Ctrl-C to stop)"
if [ -n "${DEMO_SERVE_SECONDS:-}" ]; then sleep "$DEMO_SERVE_SECONDS"; else wait $SERVER; fi
