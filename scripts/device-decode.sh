#!/usr/bin/env bash
# On one GPU (through scripts/device-run.sh): the decode attention kernel alone, per split bounds
# (`APB_DECODE_SPLIT="tiles,splits"`): the kernels' GPU tests, then `apb bench attention
# --decode-rows` for each setting, Llama-3.1-8B's heads (32 query, 8 KV, d = 128), rows of 4K and
# 32K keys; and the device-to-device copy bandwidth (the roofline). Writes $OUT/decode.jsonl,
# $OUT/tests.txt, $OUT/copy-bandwidth.json. (The 2026-12-06 run also compared a 3-stage pipeline,
# `:3` in its configs, since removed: no gain.)
# Usage: CONFIGS="4,16 16,16" scripts/device-run.sh scripts/device-decode.sh
set -euo pipefail
APB=/tmp/apb-bin/apb
xz -dc dist/apb-kernels-tests.xz > /tmp/apb-bin/apb-kernels-tests && chmod +x /tmp/apb-bin/apb-kernels-tests
/tmp/apb-bin/apb-kernels-tests --test-threads 1 gpu:: > "$OUT/tests.txt" 2>&1 \
  || echo "KERNEL TESTS FAILED" >> "$OUT/tests.txt"
tail -2 "$OUT/tests.txt" | head -1
# The roofline's denominator.
python3 scripts/copy_bandwidth.py > "$OUT/copy-bandwidth.json"
cat "$OUT/copy-bandwidth.json"
for split in ${CONFIGS:-4,16 2,32 8,16 16,16 32,16}; do
  APB_DECODE_SPLIT=$split $APB bench attention --decode-rows 1,8,25,32 \
    --lengths 4096,32768 --head-dims 128 \
    | python3 -c "import json,sys; [print(json.dumps({'split': '$split', **json.loads(l)})) for l in sys.stdin]" \
    | tee -a "$OUT/decode.jsonl"
done
