#!/usr/bin/env bash
# Continuous batching on the CPU (SmolLM2, f32): `apb bench serve` against `apb serve` with
# --max-num-seqs N and with --max-num-seqs 1 (one request at a time: the peer), one after the
# other in one run. Two loads: dense on one rank, 16 concurrent short prompts, 128 output tokens
# (decode-bound); apb on 4 thread ranks, 8 concurrent ~2K-token prompts, 128 output tokens (and
# batched again with prefills that do not yield to decode steps).
# Writes bench/results/cpu-serve-batching-DATE.{json,md} (raw reports under .cache/).
set -euo pipefail
cd "$(dirname "$0")/.."
APB=${APB:-target/release/apb}
cargo build --release --locked -q -p apb-host
out=.cache/serve-batch; mkdir -p "$out"
port=18181
serve_bench() { # label, serve args..., -- bench args...
  local label=$1; shift
  local sargs=() bargs=()
  while [ "$1" != "--" ]; do sargs+=("$1"); shift; done; shift
  bargs=("$@")
  $APB serve --port $port "${sargs[@]}" 2> "$out/$label.serve.log" &
  local pid=$!
  for _ in $(seq 600); do grep -q '^ready:' "$out/$label.serve.log" && break; sleep 0.2; done
  $APB bench serve --url http://127.0.0.1:$port "${bargs[@]}" --json "$out/$label.json" | tee "$out/$label.txt"
  kill $pid; wait $pid || true
}
for seqs in 16 1; do
  serve_bench "dense-seqs$seqs" --max-num-seqs $seqs -- --num-prompts 16 --concurrency 16 --input-len 64 --output-len 128
done
for seqs in 8 1; do
  serve_bench "apb4-seqs$seqs" --attention apb --world-size 4 --max-num-seqs $seqs -- \
    --num-prompts 8 --concurrency 8 --input-len 2048 --output-len 128 --question "What is the last word?"
done
# The same batched load with prefills that never yield to decode steps: what yielding buys
# (each stream's longest token gap) and costs (throughput).
serve_bench "apb4-seqs8-noyield" --attention apb --world-size 4 --max-num-seqs 8 \
  --max-decode-gap-ms 1000000000 -- \
  --num-prompts 8 --concurrency 8 --input-len 2048 --output-len 128 --question "What is the last word?"
python3 - "$out" <<'PY'
import json, os, subprocess, sys, time
out = sys.argv[1]
r = {k: json.load(open(f"{out}/{k}.json"))["report"] for k in ["dense-seqs16", "dense-seqs1", "apb4-seqs8", "apb4-seqs1", "apb4-seqs8-noyield"]}
for k in r: r[k].pop("samples_detail", None)
date = time.strftime("%Y-%m-%d")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | sed 's/.*: *//'"], capture_output=True, text=True).stdout.strip()
res = {"what": "apb bench serve against apb serve, SmolLM2-135M-Instruct f32 on the CPU, --max-num-seqs N vs 1 (one request at a time)",
       "device": f"{cpu}, {os.cpu_count()} cores", "commit": commit, "date": date,
       "command": "bench/serve-batch-cpu.sh", "reports": r,
       "dense_throughput_ratio": r["dense-seqs16"]["output_throughput"] / r["dense-seqs1"]["output_throughput"],
       "apb4_throughput_ratio": r["apb4-seqs8"]["output_throughput"] / r["apb4-seqs1"]["output_throughput"]}
json.dump(res, open(f"bench/results/cpu-serve-batching-{date}.json", "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "reports"}, indent=1))
PY
