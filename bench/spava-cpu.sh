#!/usr/bin/env bash
# Issue 25's CPU measurement: every rank of a 4-rank prefill where attention dominates (SmolLM2
# shapes, 2 layers, random f32 weights: bench/smollm2-2layers.json), apb, spava and zigzag in one
# run, each rank's share alone (`--only-rank`: the other ranks' passing blocks stand in at their
# planned size; communication excluded). Writes bench/results/cpu-spava-balance-DATE.json.
# Usage: bench/spava-cpu.sh [LEN]   (default 32768)
set -euo pipefail
cd "$(dirname "$0")/.."
LEN=${1:-32768}
cargo build -q --release --locked -p apb-host
out=$(mktemp -d)
for m in apb spava zigzag; do
  for h in 0 1 2 3; do
    ./target/release/apb bench prefill --config bench/smollm2-2layers.json --lengths "$LEN" \
      --attention "$m" --world-size 4 --only-rank "$h" --device cpu --dtype f32 \
      --json "$out/$m-$h.json" > /dev/null
  done
done
python3 - "$out" "$LEN" <<'PY'
import json, os, subprocess, sys, time
out, n = sys.argv[1], int(sys.argv[2])
res = {"what": "apb bench prefill --only-rank H, every rank of 4, SmolLM2 shapes with 2 layers (random f32 weights), CPU",
       "command": f"bench/spava-cpu.sh {n}", "date": time.strftime("%Y-%m-%d"),
       "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
       "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
       "cores": os.cpu_count(), "tokens": n, "methods": {}}
for m in ("apb", "spava", "zigzag"):
    ranks = []
    for h in range(4):
        v = json.load(open(f"{out}/{m}-{h}.json"))
        ranks.append(v["results"][0])
    secs = [r["wall_s"] for r in ranks]
    res["methods"][m] = {"rank_seconds": secs, "slowest_s": max(secs), "seconds_max_over_min": max(secs) / min(secs),
                         "pairs_per_rank": ranks[0]["per_rank_pairs"], "pairs_max_over_min": ranks[0]["pairs_max_over_min"],
                         "plan": ranks[0]["plan"]}
a, s, z = (res["methods"][m]["slowest_s"] for m in ("apb", "spava", "zigzag"))
res["spava_over_apb"] = s / a
res["spava_over_zigzag"] = s / z
path = f"bench/results/cpu-spava-balance-{res['date']}.json"
json.dump(res, open(path, "w"), indent=1)
print(json.dumps(res, indent=1))
print("wrote", path)
PY
