"""PyTorch peer for `apb bench`, run on the same GPU in the same device call.

(1) SDPA's flash backend alone (causal, bf16, GQA by enable_gqa) at the shape of `apb bench
attention`; (2) a dense single-GPU prefill of a llama-family model of the same preset shapes with
random weights (RMSNorm, RoPE, SDPA flash, SwiGLU; no LM head), like `apb bench prefill`'s dense.
Prints one JSON object.
"""
import argparse, json, math, time
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

PRESETS = {
    "llama-3.1-8b": dict(h=4096, i=14336, layers=32, n_h=32, n_kv=8, vocab=128256, theta=500000.0),
}


def timed(fn, iters):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def attention_alone(seq, heads, kv_heads, d):
    q = torch.randn(1, heads, seq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, seq, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, seq, d, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        for _ in range(3):
            run()
        s = timed(run, 10)
    flops = 4.0 * d * heads * seq * (seq + 1) / 2
    return dict(seq=seq, heads=heads, kv_heads=kv_heads, head_dim=d, seconds=s, tflops=flops / s / 1e12)


def prefill(cfg, lengths):
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
    def run(n):
        ids = torch.randint(0, cfg["vocab"] - 1024, (1, n), device="cuda")
        x = emb[ids]
        f = torch.arange(n, device="cuda").float()[:, None] * inv[None]
        cos, sin = f.cos().to(torch.bfloat16), f.sin().to(torch.bfloat16)
        for ly in layers:
            y = F.rms_norm(x, (h,), ly["n1"], 1e-5)
            qkv = y @ ly["qkv"].T
            q, k, v = qkv.split([n_h * d, n_kv * d, n_kv * d], -1)
            q = rope(q.view(1, n, n_h, d).transpose(1, 2), cos, sin)
            k = rope(k.view(1, n, n_kv, d).transpose(1, 2), cos, sin)
            v = v.view(1, n, n_kv, d).transpose(1, 2)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + a.transpose(1, 2).reshape(1, n, n_h * d) @ ly["o"].T
            y = F.rms_norm(x, (h,), ly["n2"], 1e-5)
            g, u = (y @ ly["gu"].T).chunk(2, -1)
            x = x + (F.silu(g) * u) @ ly["down"].T
        return x

    run(4096)
    out = []
    for n in lengths:
        s = timed(lambda: run(n), 1)
        out.append(dict(length=n, wall_s=s, tokens_per_s=n / s))
        del s
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--skip-prefill", action="store_true")
    a = ap.parse_args()
    res = dict(torch=torch.__version__, device=torch.cuda.get_device_name(),
               attention=[attention_alone(a.seq, 32, 8, 128), attention_alone(a.seq, 32, 8, 64)])
    if not a.skip_prefill:
        res["dense_prefill"] = prefill(PRESETS[a.config], [int(x) for x in a.lengths.split(",")])
    print(json.dumps(res))
