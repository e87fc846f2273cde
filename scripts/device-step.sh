#!/usr/bin/env bash
# On one GPU (through scripts/device-run.sh): where a batched decode step's time goes. The row
# kernels' tests (both block shapes), then N x P (128 out) against `apb serve`: this build with
# its peer (--max-num-seqs 1), this build batched with APB_ROWS_WARPS=1, and batched under
# APB_PROFILE=host and =synced (per-span times in /metrics); then 8 x 32K with its peer. An older
# build ($OLD: dist/apb-$OLD.xz), if given, runs batched too. All under $OUT/step.tar.gz.
# Usage: OLD=ff5d66a COMMIT=<this build's commit> scripts/device-run.sh scripts/device-step.sh
set -euo pipefail
R=$OUT
runs=(kernels new w1 host synced 32k)
for d in "${runs[@]}" old; do mkdir -p "$R/$d"; done
xz -dc dist/apb-kernels-tests.xz > /tmp/apb-bin/apb-kernels-tests && chmod +x /tmp/apb-bin/apb-kernels-tests
for w in 4 1; do
  APB_ROWS_WARPS=$w /tmp/apb-bin/apb-kernels-tests --test-threads 1 --nocapture gpu:: > "$R/kernels/tests-w$w.txt" 2>&1 \
    || echo "KERNEL TESTS FAILED" >> "$R/kernels/tests-w$w.txt"
  tail -2 "$R/kernels/tests-w$w.txt"
done
export N=${N:-32} P=${P:-4096} T=128
batch() { local d=$1; shift; env OUT="$R/$d" "$@" scripts/device-batch.sh > "$R/$d/log.txt" 2>&1 || echo "$d failed" >> "$R/$d/log.txt"; }
batch new
batch w1 APB_ROWS_WARPS=1 SEQS=$N
if [ -n "${OLD:-}" ] && [ -f "dist/apb-$OLD.xz" ]; then
  xz -dc "dist/apb-$OLD.xz" > /tmp/apb-bin/apb-old && chmod +x /tmp/apb-bin/apb-old
  batch old APB=/tmp/apb-bin/apb-old SEQS=$N
fi
batch host APB_PROFILE=host SEQS=$N
batch synced APB_PROFILE=synced SEQS=$N
batch 32k N=8 P=32768
for d in "${runs[@]}" old; do
  echo "== $d"; grep -h '"output_tokens_per_s"\|short_ttft' "$R/$d"/batch-*.json 2>/dev/null | head -6 || true
  grep -h '^apb_decode_step_seconds_sum\|^apb_decode_step_seconds_count\|^apb_profile' "$R/$d"/batch-metrics-*.txt 2>/dev/null || true
done
tar -C "$R" -czf "$R/step.tar.gz" "${runs[@]}" old
rm -rf "${runs[@]/#/$R/}" "$R/old"
