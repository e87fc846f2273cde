#!/usr/bin/env bash
# GPU smoke check, run on the device through scripts/device-run.sh: the CUDA build generates the
# same greedy tokens as the CPU build on the committed tiny checkpoints (f32), for dense, ring and
# apb (2 ranks as processes on 2 GPUs over NCCL), faults (stalled / dead rank), and bf16 runs. Prints one line per check; exit 1 on a miss.
set -u
APB=/tmp/apb-bin/apb
fail=0
doc=$(python3 -c 'print(" ".join(["the quick brown fox jumps over the lazy dog"] * 8))')
check() { # label, args...
  local label=$1; shift
  local cpu gpu
  # stdout is the JSON result; stderr (NCCL or rank notes) is shown, not parsed.
  cpu=$($APB generate "$@" --device cpu --json 2>/tmp/smoke-cpu.err) || { echo "FAIL $label cpu: $cpu $(tail -n 5 /tmp/smoke-cpu.err)"; fail=1; return; }
  gpu=$($APB generate "$@" --device cuda --json 2>/tmp/smoke-gpu.err) || { echo "FAIL $label cuda: $gpu $(tail -n 5 /tmp/smoke-gpu.err)"; fail=1; return; }
  [ -s /tmp/smoke-gpu.err ] && echo "note $label cuda stderr: $(tail -n 3 /tmp/smoke-gpu.err)"
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
# Faults: a rank that stalls (alive, never reaches a collective) or dies takes the whole group down
# with a non-zero exit and a message naming it, within a bounded time (here --collective-timeout 5).
fault() { # label, VAR=value, expected message (grep -E)
  local label=$1 inject=$2 want=$3 t0 out rc dt
  t0=$(date +%s)
  out=$(env "$inject" timeout 120 $APB generate -m tests/fixtures/tiny-llama31 --prompt "$doc" --question "the lazy dog" \
    --max-new-tokens 4 --attention apb --world-size 2 --anchor-len 64 --passing-len 32 --device cuda --collective-timeout 5 2>&1)
  rc=$?; dt=$(( $(date +%s) - t0 ))
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $dt -lt 60 ] && echo "$out" | grep -qE "$want"; then
    echo "ok   $label: exit $rc after ${dt}s: $(echo "$out" | grep -E "$want" | head -n 1)"
  else
    echo "FAIL $label: exit $rc after ${dt}s: $(echo "$out" | tail -n 5)"; fail=1
  fi
}
fault "rank 1 stalls" APB_FAULT_STALL_RANK=1 "rank 0: NCCL .* did not finish within 5s"
fault "rank 0 stalls" APB_FAULT_STALL_RANK=0 "rank 1: NCCL .* did not finish within 5s"
fault "rank 1 dies" APB_FAULT_EXIT_RANK=1 "rank process exited|lost a peer"
sleep 2; pgrep -f "apb-bin/apb generate" && { echo "FAIL rank processes left behind"; fail=1; }
exit $fail
