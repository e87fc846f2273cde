#!/usr/bin/env bash
# Short requests on thread ranks (SmolLM2, f32, the CPU): spread over the ranks
# (--spread-short-requests on) against all on rank 0 (off, what `auto` picks where ranks share
# compute), one after the other in one run: `apb serve --attention apb --world-size 2
# --max-num-seqs 16` under `apb bench serve` with 16 concurrent 64-token prompts, 64 output
# tokens. Why `auto` is off there: threads share the cores, so spreading buys no compute and a
# step whose rows sit on two ranks pays the per-layer merge that one rank skips.
# Writes bench/results/cpu-spread-short-DATE.json (raw reports under .cache/).
set -euo pipefail
cd "$(dirname "$0")/.."
APB=${APB:-target/release/apb}
cargo build --release --locked -q -p apb-host
out=.cache/spread; mkdir -p "$out"
port=18182
for spread in off on; do
  $APB serve --port $port --attention apb --world-size 2 --max-num-seqs 16 \
    --spread-short-requests $spread 2> "$out/$spread.serve.log" &
  pid=$!
  for _ in $(seq 600); do grep -q '^ready:' "$out/$spread.serve.log" && break; sleep 0.2; done
  $APB bench serve --url http://127.0.0.1:$port --num-prompts 16 --concurrency 16 \
    --input-len 64 --output-len 64 --json "$out/$spread.json" | tee "$out/$spread.txt"
  kill $pid; wait $pid || true
done
python3 - "$out" <<'PY'
import json, os, subprocess, sys, time
out = sys.argv[1]
r = {k: json.load(open(f"{out}/{k}.json"))["report"] for k in ["off", "on"]}
ranks = {k: sorted({s["first_rank"] for s in r[k]["samples"]}) for k in r}
for k in r: r[k].pop("samples_detail", None)
date = time.strftime("%Y-%m-%d")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | sed 's/.*: *//'"], capture_output=True, text=True).stdout.strip()
res = {"what": "apb serve --attention apb --world-size 2 (thread ranks), 16 concurrent 64-token prompts, 64 out: --spread-short-requests on vs off",
       "device": f"{cpu}, {os.cpu_count()} cores", "commit": commit, "date": date,
       "command": "bench/spread-cpu.sh", "first_ranks": ranks, "reports": r,
       "on_over_off_throughput": r["on"]["output_throughput"] / r["off"]["output_throughput"]}
json.dump(res, open(f"bench/results/cpu-spread-short-{date}.json", "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "reports"}, indent=1))
PY
