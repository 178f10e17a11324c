#!/usr/bin/env bash
# The main job on the embedded default: synthetic adapters → compress → inspect → export → add.
set -euo pipefail
OUT=${1:-demo_out}
BIN=.venv/bin
rm -rf "$OUT"
mkdir -p "$OUT"
echo "== 1. 200 synthetic rank-8 PEFT adapters (q/k/v of a 2-layer, hidden-256 Llama) + 1 unrelated one"
$BIN/python scripts/make_adapters.py "$OUT/adapters" --n 200 --structure shared --seed 0
$BIN/python scripts/make_adapters.py "$OUT/late" --n 1 --structure random --seed 7
echo "== 2. compress: JD-Full, rank and clusters chosen automatically (mean error < 0.5)"
$BIN/vllm-jd compress "$OUT/adapters" --out "$OUT/store"
echo "== 3. inspect"
$BIN/vllm-jd inspect "$OUT/store" | head -14
echo "== 4. export one adapter back to a standard PEFT adapter"
$BIN/vllm-jd export "$OUT/store" adapter-0042 --out "$OUT/exported/adapter-0042"
ls "$OUT/exported/adapter-0042"
echo "== 5. add a new, unrelated adapter: too far from every cluster, so it is kept exact"
mv "$OUT/late/adapter-0000" "$OUT/late/newcomer"
$BIN/vllm-jd add "$OUT/store" "$OUT/late/newcomer"
echo "demo done: store in $OUT/store"
