#!/usr/bin/env bash
# On one GPU (through scripts/device-run.sh): where a batched decode step's time goes. The new
# kernels' tests, then 32 x 4K (128 out) against `apb serve`: this build with its peer
# (--max-num-seqs 1), an older build ($OLD, dist/apb-$OLD.xz) batched, and this build batched
# under APB_PROFILE=host and =synced (per-span times in /metrics). All under $OUT/step.tar.gz.
# Usage: OLD=ff5d66a COMMIT=<this build's commit> scripts/device-run.sh scripts/device-step.sh
set -euo pipefail
R=$OUT
mkdir -p "$R/kernels" "$R/new" "$R/old" "$R/host" "$R/synced"
xz -dc dist/apb-kernels-tests.xz > /tmp/apb-bin/apb-kernels-tests && chmod +x /tmp/apb-bin/apb-kernels-tests
/tmp/apb-bin/apb-kernels-tests --test-threads 1 --nocapture gpu:: > "$R/kernels/tests.txt" 2>&1 \
  || echo "KERNEL TESTS FAILED" >> "$R/kernels/tests.txt"
tail -3 "$R/kernels/tests.txt"
export N=32 P=4096 T=128
OUT=$R/new scripts/device-batch.sh > "$R/new/log.txt" 2>&1 || echo "new failed" >> "$R/new/log.txt"
if [ -n "${OLD:-}" ] && [ -f "dist/apb-$OLD.xz" ]; then
  xz -dc "dist/apb-$OLD.xz" > /tmp/apb-bin/apb-old && chmod +x /tmp/apb-bin/apb-old
  OUT=$R/old APB=/tmp/apb-bin/apb-old SEQS=$N scripts/device-batch.sh > "$R/old/log.txt" 2>&1 || echo "old failed" >> "$R/old/log.txt"
fi
OUT=$R/host APB_PROFILE=host SEQS=$N scripts/device-batch.sh > "$R/host/log.txt" 2>&1 || echo "host failed" >> "$R/host/log.txt"
OUT=$R/synced APB_PROFILE=synced SEQS=$N scripts/device-batch.sh > "$R/synced/log.txt" 2>&1 || echo "synced failed" >> "$R/synced/log.txt"
for d in new old host synced; do
  echo "== $d"; grep -h '"output_tokens_per_s"\|short_ttft' "$R/$d"/batch-*.json 2>/dev/null | head -4 || true
  grep -h '^apb_decode_step_seconds_sum\|^apb_decode_step_seconds_count\|^apb_profile' "$R/$d"/batch-metrics-*.txt 2>/dev/null || true
done
tar -C "$R" -czf "$R/step.tar.gz" kernels new old host synced
rm -rf "$R/kernels" "$R/new" "$R/old" "$R/host" "$R/synced"
