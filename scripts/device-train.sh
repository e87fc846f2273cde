#!/usr/bin/env bash
# On one GPU (through scripts/device-run.sh): `apb train-heads` on CUDA in bf16 — a short run on a
# model of SmolLM2-135M's shapes (random bf16 weights made here with PyTorch; the default model's
# real tokenizer from dist/tokenizer.json with a ChatML template), to show it works and its step
# time (the weights do not change the work). Writes $OUT/train-cuda.log.
set -euo pipefail
APB=${APB:-/tmp/apb-bin/apb}
W=${W:-$PWD/.cache/smollm2-random}
mkdir -p "$W"
cp dist/tokenizer.json "$W/tokenizer.json"
python3 scripts/random_llama.py smollm2-135m "$W"
python3 - "$W" <<'PY'
import json, sys
chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
json.dump({"chat_template": chatml, "eos_token": "<|im_end|>"}, open(f"{sys.argv[1]}/tokenizer_config.json", "w"))
PY
OUTF="${OUT:-/tmp}/train-cuda.log"
# 30 steps on generated 2K-token records; the step time is the rate of the last 20 steps.
time "$APB" train-heads -m "$W" --device cuda --dtype bf16 --synthetic 30 --synthetic-tokens 2048 \
  --steps 30 --hidden 128 --save-every 10 --out "$W/heads.safetensors" 2>&1 \
  | while IFS= read -r l; do printf '%s %s\n' "$(date +%s.%N)" "$l"; done | tee "$OUTF"
ls -la "$W"/heads.safetensors
