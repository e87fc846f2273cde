#!/usr/bin/env bash
# GPU smoke check, run on the device through scripts/device-run.sh: the CUDA build generates the
# same greedy tokens as the CPU build on the committed tiny checkpoints (f32), for dense, ring and
# apb (2 ranks as threads on one GPU), and bf16 runs. Prints one line per check; exit 1 on a miss.
set -u
APB=/tmp/apb-bin/apb
fail=0
doc=$(python3 -c 'print(" ".join(["the quick brown fox jumps over the lazy dog"] * 8))')
check() { # label, args...
  local label=$1; shift
  local cpu gpu
  cpu=$($APB generate "$@" --device cpu --json 2>&1) || { echo "FAIL $label cpu: $cpu"; fail=1; return; }
  gpu=$($APB generate "$@" --device cuda --json 2>&1) || { echo "FAIL $label cuda: $gpu"; fail=1; return; }
  local t1 t2
  t1=$(echo "$cpu" | python3 -c 'import json,sys; print(json.load(sys.stdin)["text"])')
  t2=$(echo "$gpu" | python3 -c 'import json,sys; print(json.load(sys.stdin)["text"])')
  if [ "$t1" == "$t2" ]; then echo "ok   $label: $(echo "$gpu" | head -c 300)"; else echo "FAIL $label: cpu=$t1 | cuda=$t2"; fail=1; fi
}
for m in tiny-llama31 tiny-qwen2; do
  M=tests/fixtures/$m
  check "$m dense f32" -m $M --prompt "$doc" --max-new-tokens 12 --ignore-eos
  check "$m ring H=2 f32" -m $M --prompt "$doc" --max-new-tokens 12 --ignore-eos --attention ring --world-size 2
  check "$m apb H=2 f32" -m $M --prompt "$doc" --question "the lazy dog" --max-new-tokens 12 --ignore-eos --attention apb --world-size 2 --anchor-len 64 --passing-len 32
done
out=$($APB generate -m tests/fixtures/tiny-llama31 --prompt "$doc" --max-new-tokens 12 --ignore-eos --device cuda --dtype bf16 --json 2>&1) && echo "ok   bf16 runs: $out" || { echo "FAIL bf16: $out"; fail=1; }
exit $fail
