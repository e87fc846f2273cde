#!/usr/bin/env bash
# On one GPU (through scripts/device-run.sh): where a batched decode step's time goes. The
# kernels' GPU tests, then N x P (128 out) against `apb serve`: this build with its peer
# (--max-num-seqs 1; NEW_SEQS=N: batched only), and batched under
# APB_PROFILE=host and =synced (per-span times in /metrics); then 8 x 32K with its peer. An older
# build ($OLD: dist/apb-$OLD.xz), if given, runs batched too. All under $OUT/step.tar.gz.
# RUNS picks some of: kernels linear new host synced 32k (default all; old runs when OLD is given).
# `linear`: `apb bench linear` (the decode step's projections, ours against cuBLAS).
# Usage: OLD=ff5d66a COMMIT=<this build's commit> scripts/device-run.sh scripts/device-step.sh
set -euo pipefail
R=$OUT
read -r -a runs <<< "${RUNS:-kernels linear new host synced 32k}"
[ -n "${OLD:-}" ] && runs+=(old)
has() { [[ " ${runs[*]} " == *" $1 "* ]]; }
for d in "${runs[@]}"; do mkdir -p "$R/$d"; done
if has kernels; then
  xz -dc dist/apb-kernels-tests.xz > /tmp/apb-bin/apb-kernels-tests && chmod +x /tmp/apb-bin/apb-kernels-tests
  /tmp/apb-bin/apb-kernels-tests --test-threads 1 --nocapture gpu:: > "$R/kernels/tests.txt" 2>&1 \
    || echo "KERNEL TESTS FAILED" >> "$R/kernels/tests.txt"
  tail -2 "$R/kernels/tests.txt"
fi
if has linear; then
  /tmp/apb-bin/apb bench linear > "$R/linear/linear.jsonl" 2> "$R/linear/stderr.txt" || echo "LINEAR BENCH FAILED" >> "$R/linear/linear.jsonl"
  cat "$R/linear/linear.jsonl"
fi
export N=${N:-32} P=${P:-4096} T=128
batch() { local d=$1; shift; has "$d" || return 0; env OUT="$R/$d" "$@" scripts/device-batch.sh > "$R/$d/log.txt" 2>&1 || echo "$d failed" >> "$R/$d/log.txt"; }
batch new ${NEW_SEQS:+SEQS=$NEW_SEQS}
if [ -n "${OLD:-}" ] && [ -f "dist/apb-$OLD.xz" ]; then
  xz -dc "dist/apb-$OLD.xz" > /tmp/apb-bin/apb-old && chmod +x /tmp/apb-bin/apb-old
  batch old APB=/tmp/apb-bin/apb-old SEQS=$N
fi
batch host APB_PROFILE=host SEQS=$N
batch synced APB_PROFILE=synced SEQS=$N
batch 32k N=8 P=32768
for d in "${runs[@]}"; do
  echo "== $d"; grep -h '"output_tokens_per_s"\|short_ttft\|short_first_token_[a-z_]*_s"\|short_wait\|short_prefill' "$R/$d"/batch-*.json 2>/dev/null | head -40 || true
  # The load's own steps (before the idle shorts and the invariance check).
  grep -H '^apb_decode_step_seconds_sum\|^apb_decode_step_seconds_count\|^apb_decode_batch_size_sum\|^apb_decode_batch_size_count\|^apb_profile' "$R/$d"/batch-*-load-metrics.txt 2>/dev/null || true
done
tar -C "$R" -czf "$R/step.tar.gz" "${runs[@]}"
rm -rf "${runs[@]/#/$R/}"
