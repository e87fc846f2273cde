#!/usr/bin/env bash
# Rank processes sharing one GPU over the host communicator (issue 22's GPU part), through
# scripts/device-run.sh: every distributed method as 4 rank processes on one GPU (--comm host,
# CUDA tensors staged through host memory) against 4 CPU thread ranks (f32): greedy tokens equal,
# first-token logits within 1e-4 relative; then kill -9 of a worker mid-generation on the GPU.
# Prints one line per check; exit 1 on a miss.
set -u
APB=/tmp/apb-bin/apb
OUT="${OUT:-/tmp/apb-out}"
fail=0
doc=$(python3 -c 'print(" ".join(["the quick brown fox jumps over the lazy dog"] * 8))')
M=tests/fixtures/tiny-llama31
for m in zigzag apb ring ulysses star; do
  # 4 ranks (ulysses: 2, the fixture's KV heads); apb's anchor and passing fit blocks of 88 tokens
  # (else the plan needs fewer ranks and rank processes run it on rank 0 alone).
  w=4; [ $m = ulysses ] && w=2
  args=(-m $M --prompt "$doc" --question "the lazy dog" --max-new-tokens 12 --ignore-eos --attention $m
        --world-size $w --min-rank-tokens 0 --json --first-logits)
  [ $m = apb ] && args+=(--anchor-len 32 --passing-len 16)
  $APB generate "${args[@]}" --device cpu --ranks threads > "$OUT/hc-$m-cpu.json" 2> "$OUT/hc-$m-cpu.err" \
    || { echo "FAIL $m cpu: $(tail -n 5 "$OUT/hc-$m-cpu.err")"; fail=1; continue; }
  t0=$(date +%s.%N)
  $APB generate "${args[@]}" --device cuda --ranks processes --comm host > "$OUT/hc-$m-gpu.json" 2> "$OUT/hc-$m-gpu.err" \
    || { echo "FAIL $m cuda processes: $(tail -n 5 "$OUT/hc-$m-gpu.err")"; fail=1; continue; }
  python3 - "$OUT/hc-$m-cpu.json" "$OUT/hc-$m-gpu.json" "$m" "$t0" <<'PY' || fail=1
import json, sys, time
a, b = (json.load(open(p)) for p in sys.argv[1:3])
m = sys.argv[3]
la, lb = a["first_logits"], b["first_logits"]
scale = max(abs(x) for x in la)
err = max(abs(x - y) for x, y in zip(la, lb)) / scale
ok = a["text"] == b["text"] and len(la) == len(lb) and err <= 1e-4 and b.get("comm") == "host"
print(("ok  " if ok else "FAIL"), f"{m}: 4 processes on one GPU (comm={b.get('comm')}, rank_mode={b.get('rank_mode')}, ran={b.get('method')})"
      f" vs 4 CPU threads: tokens {'equal' if a['text'] == b['text'] else 'DIFFER'}, first logits max rel err {err:.2e} over {len(la)}")
sys.exit(0 if ok else 1)
PY
done
# kill -9 of a worker mid-generation: the launcher names the rank, exits non-zero, leaves no process.
$APB generate -m $M --prompt "$doc" --question "the lazy dog" --max-new-tokens 100000 --ignore-eos \
  --attention zigzag --world-size 4 --min-rank-tokens 0 --device cuda --ranks processes --comm host \
  > "$OUT/hc-kill.out" 2> "$OUT/hc-kill.err" &
launcher=$!
# Killed once tokens stream (the fixture's 512-position context ends the generation in seconds).
for _ in $(seq 600); do [ "$(stat -c %s "$OUT/hc-kill.out" 2>/dev/null || echo 0)" -gt 20 ] && break; sleep 0.05; done
victim=$(grep -oE "started rank 2 \(pid [0-9]+\)" "$OUT/hc-kill.err" | grep -oE "[0-9]+\)$" | tr -d ')')
t0=$(date +%s)
[ -n "$victim" ] && kill -9 "$victim"
for _ in $(seq 60); do kill -0 $launcher 2>/dev/null || break; sleep 0.5; done
wait $launcher; rc=$?; dt=$(( $(date +%s) - t0 ))
left=$(pgrep -f "apb-bin/apb generate" | wc -l)
if [ -n "$victim" ] && [ $rc -ne 0 ] && [ $dt -lt 30 ] && [ "$left" -eq 0 ] && grep -qE "rank 2" "$OUT/hc-kill.err"; then
  echo "ok   kill -9 rank 2 (pid $victim) on GPU: exit $rc after ${dt}s, no process left: $(grep -E 'rank 2' "$OUT/hc-kill.err" | tail -n 1)"
else
  echo "FAIL kill -9: victim=$victim exit $rc after ${dt}s, $left processes left: $(tail -n 5 "$OUT/hc-kill.err")"; fail=1
  pkill -9 -f "apb-bin/apb generate"
fi
exit $fail
