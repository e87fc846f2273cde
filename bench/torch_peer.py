"""PyTorch peers for `apb bench`, run on the same GPU in the same device call.

(1) Attention alone at the shapes of `apb bench attention` (causal, bf16, GQA via enable_gqa) with
SDPA's flash backend (FlashAttention-2), its cuDNN backend, and no backend pinned (PyTorch's
default choice: what a user gets). (2) A dense single-GPU prefill of Llama-3.1-8B shapes with
random weights as a user runs it: HF transformers `LlamaForCausalLM` with its default attention
implementation (SDPA, default backend), KV cache on, the LM head on the last position only. If
transformers is not installed, a plain PyTorch model of the same shapes with default SDPA stands in
and the result says so. Prints one JSON object.
"""
import argparse, json, time
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

LLAMA_8B = dict(h=4096, i=14336, layers=32, n_h=32, n_kv=8, vocab=128256, theta=500000.0)


def timed(fn, iters):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def attention_alone(seq, heads, kv_heads, d, backend):
    q = torch.randn(1, heads, seq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, seq, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, seq, d, device="cuda", dtype=torch.bfloat16)
    run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    flops = 4.0 * d * heads * seq * (seq + 1) / 2
    iters = int(min(50, max(3, 2e14 / flops)))
    try:
        if backend == "default":
            for _ in range(3):
                run()
            s = timed(run, iters)
        else:
            pinned = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
            with sdpa_kernel(pinned):
                for _ in range(3):
                    run()
                s = timed(run, iters)
    except RuntimeError as e:  # a backend that refuses the shape
        return dict(seq=seq, head_dim=d, backend=backend, error=str(e)[:200])
    return dict(seq=seq, heads=heads, kv_heads=kv_heads, head_dim=d, backend=backend,
                seconds=s, tflops=flops / s / 1e12)


def hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM
    import transformers
    conf = LlamaConfig(hidden_size=cfg["h"], intermediate_size=cfg["i"], num_hidden_layers=cfg["layers"],
                       num_attention_heads=cfg["n_h"], num_key_value_heads=cfg["n_kv"],
                       vocab_size=cfg["vocab"], rope_theta=cfg["theta"], max_position_embeddings=262144)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(conf)
    torch.set_default_dtype(torch.float32)
    model.eval()

    @torch.no_grad()
    def run(ids):
        out = model.model(input_ids=ids, use_cache=True)
        return model.lm_head(out.last_hidden_state[:, -1:])

    label = (f"HF transformers {transformers.__version__} LlamaForCausalLM, attn_implementation="
             f"{model.config._attn_implementation} (default), SDPA default backend")
    return run, label


def plain_model(cfg):
    h, i, L, n_h, n_kv = cfg["h"], cfg["i"], cfg["layers"], cfg["n_h"], cfg["n_kv"]
    d = h // n_h
    bf = dict(device="cuda", dtype=torch.bfloat16)
    w = lambda *s: torch.randn(*s, **bf) * 0.02
    layers = [dict(qkv=w((n_h + 2 * n_kv) * d, h), o=w(h, n_h * d), gu=w(2 * i, h), down=w(h, i),
                   n1=torch.ones(h, **bf), n2=torch.ones(h, **bf)) for _ in range(L)]
    emb = w(cfg["vocab"], h)
    inv = 1.0 / (cfg["theta"] ** (torch.arange(0, d, 2, device="cuda").float() / d))

    def rope(x, cos, sin):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    @torch.no_grad()
    def run(ids):
        n = ids.shape[1]
        x = emb[ids]
        f = torch.arange(n, device="cuda").float()[:, None] * inv[None]
        cos, sin = f.cos().to(torch.bfloat16), f.sin().to(torch.bfloat16)
        for ly in layers:
            y = F.rms_norm(x, (h,), ly["n1"], 1e-5)
            q, k, v = (y @ ly["qkv"].T).split([n_h * d, n_kv * d, n_kv * d], -1)
            q = rope(q.view(1, n, n_h, d).transpose(1, 2), cos, sin)
            k = rope(k.view(1, n, n_kv, d).transpose(1, 2), cos, sin)
            v = v.view(1, n, n_kv, d).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + a.transpose(1, 2).reshape(1, n, n_h * d) @ ly["o"].T
            y = F.rms_norm(x, (h,), ly["n2"], 1e-5)
            g, u = (y @ ly["gu"].T).chunk(2, -1)
            x = x + (F.silu(g) * u) @ ly["down"].T
        return x[:, -1:]

    return run, "plain PyTorch Llama-3.1-8B-shaped model, SDPA default backend (transformers not installed)"


def prefill(cfg, lengths):
    try:
        run, label = hf_model(cfg)
    except ImportError:
        run, label = plain_model(cfg)
    ids = lambda n: torch.randint(0, cfg["vocab"] - 1024, (1, n), device="cuda")
    run(ids(4096))
    out = []
    for n in lengths:
        x = ids(n)
        s = timed(lambda: run(x), 1)
        out.append(dict(length=n, wall_s=s, tokens_per_s=n / s))
        torch.cuda.empty_cache()
    return dict(peer=label, results=out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--attention-lengths", default="8192,32768,131072")
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument("--prefill-lengths", default="32768,65536,131072")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    a = ap.parse_args()
    res = dict(torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
               device=torch.cuda.get_device_name())
    if not a.skip_attention:
        res["attention"] = [attention_alone(s, 32, 8, d, b)
                            for d in map(int, a.head_dims.split(","))
                            for s in map(int, a.attention_lengths.split(","))
                            for b in ("flash", "cudnn", "default")]
    if not a.skip_prefill:
        res["dense_prefill"] = prefill(LLAMA_8B, [int(x) for x in a.prefill_lengths.split(",")])
    print(json.dumps(res))
