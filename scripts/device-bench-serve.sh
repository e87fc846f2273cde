#!/usr/bin/env bash
# On one GPU (through scripts/device-run.sh): `apb bench serve` against `apb serve -m
# random:llama-3.1-8b` (Llama-3.1-8B shapes, random bf16 weights made on the GPU, the default
# model's tokenizer from dist/smollm2-metadata.gguf, which scripts/pack-device.sh cuts from the
# default model: this machine cannot download), dense on one GPU, the KV budget from the default
# --gpu-memory-utilization. Each load runs once one request at a time (--max-num-seqs 1, the
# peer) and once batched, in the same call. Loads: LOADS="N:P:T ..." (N concurrent requests of
# P prompt tokens and T output tokens; default 32 x 4096 x 128, then 8 x 32768 x 128).
# Also: a --gpu-memory-utilization that leaves no room for KV refuses to start.
set -euo pipefail
APB=${APB:-/tmp/apb-bin/apb}
export APB_CACHE=/tmp/apb-cache
mkdir -p "$APB_CACHE/models"
cp dist/smollm2-metadata.gguf "$APB_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
model=random:llama-3.1-8b
port=18091
# 0.1 of an 80 GB GPU is less than the 16 GB of weights: a clear refusal, non-zero exit.
rc=0
timeout 300 $APB serve -m $model --device cuda --dtype bf16 --port $port --gpu-memory-utilization 0.1 \
  > /dev/null 2> "$OUT/refuse.txt" || rc=$?
echo "exit $rc" >> "$OUT/refuse.txt"
tail -n 3 "$OUT/refuse.txt"
for load in ${LOADS:-32:4096:128 8:32768:128}; do
  IFS=: read -r n p t <<<"$load"
  for seqs in 1 $((n + 8)); do
    tag="$n-$p-$seqs"
    $APB serve -m $model --device cuda --dtype bf16 --port $port --max-num-seqs "$seqs" \
      --max-queued 256 2> "$OUT/serve-$tag.txt" &
    pid=$!
    for _ in $(seq 1500); do
      grep -q '^ready:' "$OUT/serve-$tag.txt" && break
      kill -0 $pid 2>/dev/null || { cat "$OUT/serve-$tag.txt"; exit 1; }
      sleep 0.2
    done
    grep -E '^(ready|KV budget)' "$OUT/serve-$tag.txt"
    # Warm-up (first kernels, allocator).
    $APB bench serve --url "http://127.0.0.1:$port" --num-prompts 2 --concurrency 2 \
      --input-len 256 --output-len 4 > /dev/null
    $APB bench serve --url "http://127.0.0.1:$port" --num-prompts "$n" --concurrency "$n" \
      --input-len "$p" --output-len "$t" --json "$OUT/bench-$tag.json" | tee "$OUT/bench-$tag.txt"
    curl -s "http://127.0.0.1:$port/metrics" > "$OUT/metrics-$tag.txt"
    kill $pid
    wait $pid || true
  done
done
python3 scripts/copy_bandwidth.py > "$OUT/copy-bandwidth.json"
cat "$OUT/copy-bandwidth.json"
