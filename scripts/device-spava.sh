#!/usr/bin/env bash
# Issue 25's GPU part, through scripts/device-run.sh: the transfer-stream test (nccl_one_gpu),
# then every rank's share of a 4-rank 128K prefill (and, with EIGHT=1, an 8-rank 256K one) of
# Llama-3.1-8B shapes for apb, spava and zigzag (`--only-rank`: communication excluded). Writes
# $OUT/nccl-one-gpu.txt and $OUT/spava-{128k-4,256k-8}-rank*.json.
set -u
APB=/tmp/apb-bin/apb
OUT="${OUT:-/tmp/apb-out}"
xz -dc dist/nccl_one_gpu.xz > /tmp/apb-bin/nccl_one_gpu && chmod +x /tmp/apb-bin/nccl_one_gpu
/tmp/apb-bin/nccl_one_gpu --test-threads=1 > "$OUT/nccl-one-gpu.txt" 2>&1; echo "nccl_one_gpu: exit $?"
tail -n 5 "$OUT/nccl-one-gpu.txt"
run() { # LEN WORLD TAG
  for h in $(seq 0 $(($2 - 1))); do
    $APB bench prefill --config llama-3.1-8b --lengths "$1" --attention apb,spava,zigzag \
      --world-size "$2" --only-rank "$h" --device cuda --dtype bf16 --json "$OUT/spava-$3-rank$h.json" \
      2>> "$OUT/spava-$3.err" | tail -n 4
  done
}
run 131072 4 128k-4
[ "${EIGHT:-0}" = 1 ] && run 262144 8 256k-8
exit 0
