"""Writes a llama-family model directory with random bf16 weights (config.json +
model.safetensors) for GPU timings where the weights do not change the work. Tensors go
straight into the safetensors file one at a time (PyTorch only, no other packages).

Usage: python3 scripts/random_llama.py llama-3.1-8b|smollm2-135m OUT_DIR
"""
import json, os, struct, sys
import torch

PRESETS = {
    "llama-3.1-8b": dict(
        config={"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "max_position_embeddings": 131072, "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2,
                "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}),
    "smollm2-135m": dict(
        config={"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                "max_position_embeddings": 8192, "tie_word_embeddings": True,
                "bos_token_id": 1, "eos_token_id": 2}),
}


def main():
    preset, out = sys.argv[1], sys.argv[2]
    cfg = PRESETS[preset]["config"]
    os.makedirs(out, exist_ok=True)
    if os.path.exists(f"{out}/model.safetensors"):
        return
    json.dump(cfg, open(f"{out}/config.json", "w"))
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_h, n_kv, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    d = h // n_h
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for l in range(L):
        p = f"model.layers.{l}."
        shapes.update({p + "self_attn.q_proj.weight": (n_h * d, h), p + "self_attn.k_proj.weight": (n_kv * d, h),
                       p + "self_attn.v_proj.weight": (n_kv * d, h), p + "self_attn.o_proj.weight": (h, n_h * d),
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
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    with open(f"{out}/model.safetensors.tmp", "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for name, shape in shapes.items():
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu()
            f.write(t.view(torch.int16).numpy().tobytes())
    os.rename(f"{out}/model.safetensors.tmp", f"{out}/model.safetensors")


if __name__ == "__main__":
    main()
