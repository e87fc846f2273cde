#!/usr/bin/env bash
# On one GPU (through scripts/device-run.sh): every kernel of a decode step, timed one at a time by
# Nsight Compute at the GPU's own clocks (`--clock-control none`: ncu changes no clock), for
# `apb generate -m random:llama-3.1-8b` (Llama-3.1-8B shapes, random bf16 weights, the default
# model's tokenizer from dist/smollm2-metadata.gguf). What it says: how many kernels a step
# launches, which, and how long each runs alone; the step's wall time minus their sum is what
# launches and gaps cost. Writes $OUT/ncu-step.csv (raw) and $OUT/ncu-step.txt (per kernel name).
# Usage: scripts/device-run.sh scripts/device-ncu-step.sh
set -euo pipefail
APB=${APB:-/tmp/apb-bin/apb}
NCU=${NCU:-/usr/local/cuda/bin/ncu}
export APB_CACHE=/tmp/apb-cache
mkdir -p "$APB_CACHE/models"
cp dist/smollm2-metadata.gguf "$APB_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
prompt="the river runs past the old mill into the valley where farmers bring apples and pears"
# Without the profiler first: the step's wall time (the decode rate of a batch of one).
$APB generate -m random:llama-3.1-8b --device cuda --dtype bf16 --prompt "$prompt" \
  --max-new-tokens 64 --ignore-eos --json > "$OUT/generate.json" 2> "$OUT/generate.err" || cat "$OUT/generate.err"
# Three tokens: the prefill's, then two decode steps (kernels after the prefill's lm_head).
"$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
  --log-file "$OUT/ncu-step.csv" \
  $APB generate -m random:llama-3.1-8b --device cuda --dtype bf16 --prompt "$prompt" \
  --max-new-tokens 3 --ignore-eos > "$OUT/ncu-generate.txt" 2>&1 || tail -5 "$OUT/ncu-generate.txt"
python3 - "$OUT/ncu-step.csv" > "$OUT/ncu-step.txt" <<'PY'
import csv, sys, collections
rows = []
with open(sys.argv[1]) as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        rows.append((int(r["ID"]), r["Kernel Name"], float(r["Metric Value"].replace(",", "")), r["Grid Size"], r["Block Size"]))
rows.sort()
print(f"{len(rows)} kernels in all")
# The last decode step: the kernels after the first step's greedy pick (`argmax_rows`, which
# ends each decode step) up to the second's.
ends = [i for i, r in enumerate(rows) if r[1].startswith("argmax_rows")]
step = rows[ends[-2] + 1 : ends[-1] + 1] if len(ends) >= 2 else rows
print(f"last step: {len(step)} kernels, {sum(r[2] for r in step) / 1e3:.1f} us summed (each alone)")
by = collections.defaultdict(lambda: [0, 0.0])
for _, name, ns, g, b in step:
    k = name.split("(")[0][:90]
    by[k][0] += 1; by[k][1] += ns
for k, (n, ns) in sorted(by.items(), key=lambda kv: -kv[1][1]):
    print(f"{n:5d} x {ns / n / 1e3:8.2f} us = {ns / 1e3:9.1f} us  {k}")
PY
cat "$OUT/ncu-step.txt"
grep -o '"decode_tokens_per_s"[^,}]*' "$OUT/generate.json" || head -c 600 "$OUT/generate.json"
