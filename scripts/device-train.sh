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
python3 - "$W" <<'PY'
import json, os, struct, sys, torch
w = sys.argv[1]
cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
       "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
       "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
       "max_position_embeddings": 8192, "tie_word_embeddings": True,
       "bos_token_id": 1, "eos_token_id": 2}
json.dump(cfg, open(f"{w}/config.json", "w"))
chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
json.dump({"chat_template": chatml, "eos_token": "<|im_end|>"}, open(f"{w}/tokenizer_config.json", "w"))
h, i, v, d = 576, 1536, 49152, 64
shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
for l in range(30):
    p = f"model.layers.{l}."
    shapes.update({p + "self_attn.q_proj.weight": (9 * d, h), p + "self_attn.k_proj.weight": (3 * d, h),
                   p + "self_attn.v_proj.weight": (3 * d, h), p + "self_attn.o_proj.weight": (h, 9 * d),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)})
header, off = {}, 0
for name, shape in shapes.items():
    n = 2
    for s in shape:
        n *= s
    header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
    off += n
hb = json.dumps(header).encode()
hb += b" " * (-len(hb) % 8)
g = torch.Generator().manual_seed(0)
with open(f"{w}/model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(hb)) + hb)
    for name, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
PY
OUTF="${OUT:-/tmp}/train-cuda.log"
# 30 steps on generated 2K-token records; the step time is the rate of the last 20 steps.
time "$APB" train-heads -m "$W" --device cuda --dtype bf16 --synthetic 30 --synthetic-tokens 2048 \
  --steps 30 --hidden 128 --save-every 10 --out "$W/heads.safetensors" 2>&1 \
  | while IFS= read -r l; do printf '%s %s\n' "$(date +%s.%N)" "$l"; done | tee "$OUTF"
ls -la "$W"/heads.safetensors
