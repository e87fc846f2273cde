#!/usr/bin/env python3
"""Reference outputs from HF transformers (PyTorch, CPU, f32) for the parity tests.

Writes, under tests/fixtures/:
  tiny-llama31/, tiny-yi/, tiny-qwen2/  random-weight checkpoints (fixed seeds) saved as
      safetensors + config.json + a byte-level tokenizer.json, and expected.json with logits
      at chosen positions and a greedy continuation;
  smollm2/expected.json  SmolLM2-135M-Instruct read from the GGUF by transformers: prompt ids,
      top-k logits of the last position, greedy continuation.

Run with scripts/reference/run.sh (it makes the venv). Tests never need Python.
"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

torch.set_grad_enabled(False)
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures")


def byte_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    alphabet.sort()
    vocab = {c: i for i, c in enumerate(alphabet)}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(path, "tokenizer.json"))


def tiny(name, model_cls, cfg, seed, n_tokens=70, positions=(0, 35, 69)):
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    # Non-trivial norms and biases so the tests see them.
    for n, p in model.named_parameters():
        if "norm" in n:
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
        elif n.endswith(".bias"):
            p.copy_(0.5 * torch.randn_like(p))
        else:
            p.copy_(0.15 * torch.randn_like(p))
    path = os.path.join(FIX, name)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer(path, cfg.vocab_size)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (1, n_tokens), generator=g)
    logits = model(ids).logits[0]
    positions = list(positions)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:]
    out = {
        "input_ids": ids[0].tolist(),
        "positions": positions,
        "logits": [logits[p].tolist() for p in positions],
        "greedy": gen.tolist(),
        "torch": torch.__version__,
    }
    with open(os.path.join(path, "expected.json"), "w") as f:
        json.dump(out, f)
    for junk in ["generation_config.json"]:
        p = os.path.join(path, junk)
        if os.path.exists(p):
            os.remove(p)
    print("wrote", path)


SMOL_PROMPTS = [
    ("plain", "The capital of France is"),
    ("chat", "What is the largest planet in the solar system?"),
    ("numbers", "Count: 1, 2, 3, 4, 5, 6,"),
]


def smollm2(gguf_path):
    d, f = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    cases = []
    for name, text in SMOL_PROMPTS:
        if name == "chat":
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        logits = model(ids).logits[0, -1]
        top = torch.topk(logits, 20)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
        cases.append({
            "name": name,
            "text": text,
            "input_ids": ids[0].tolist(),
            "top_ids": top.indices.tolist(),
            "top_logits": top.values.tolist(),
            "greedy": gen.tolist(),
            "greedy_text": tok.decode(gen),
        })
    path = os.path.join(FIX, "smollm2")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "expected.json"), "w") as fh:
        json.dump({"gguf": f, "torch": torch.__version__, "cases": cases}, fh, indent=1)
    print("wrote", path)


class Evil:
    """A pickle payload: unpickling calls os.system. Our loader must refuse it unread."""
    def __reduce__(self):
        return (os.system, ("echo apb-rs-pwned > /tmp/apb-rs-pwned",))


def heads():
    """Retaining heads for tiny-llama31 (2 layers, 4 query heads, 2 KV heads, head_dim 16) in the
    thunlp/APB-Locret layout (torch.save zip pickle, keys model.layers.{i}.self_attn.fc1/fc2.weight),
    the same tensors as safetensors, expected scores, and a malicious pickle."""
    from safetensors.torch import save_file
    torch.manual_seed(11)
    n_h, n_kv, d, hidden, layers = 4, 2, 16, 32, 2
    sd = {}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.fc1.weight"] = 0.2 * torch.randn(hidden, (n_h + 2 * n_kv) * d)
        sd[f"model.layers.{i}.self_attn.fc2.weight"] = 0.2 * torch.randn(n_kv, hidden)
    path = os.path.join(FIX, "heads")
    os.makedirs(path, exist_ok=True)
    torch.save(sd, os.path.join(path, "heads.pt"))
    save_file(sd, os.path.join(path, "heads.safetensors"))
    x = torch.randn(9, (n_h + 2 * n_kv) * d)
    w1, w2 = sd["model.layers.1.self_attn.fc1.weight"], sd["model.layers.1.self_attn.fc2.weight"]
    scores = torch.nn.functional.silu(x @ w1.T) @ w2.T
    with open(os.path.join(path, "expected.json"), "w") as f:
        json.dump({"layer": 1, "n_q": n_h * d, "n_kv": n_kv * d, "x": x.tolist(), "scores": scores.tolist()}, f)
    torch.save({"model.layers.0.self_attn.fc1.weight": Evil()}, os.path.join(path, "evil.pt"))
    print("wrote", path)


if __name__ == "__main__":
    heads()
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
    tiny("tiny-llama31", LlamaForCausalLM, LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}), seed=1)
    tiny("tiny-yi", LlamaForCausalLM, LlamaConfig(**common, rope_theta=5000000.0, tie_word_embeddings=False), seed=2)
    tiny("tiny-qwen2", Qwen2ForCausalLM, Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True), seed=3)
    smollm2(sys.argv[1])
