#!/usr/bin/env python3
"""Side-by-side CPU benchmark: `apb generate` vs HF transformers (PyTorch) on SmolLM2-135M.

Same GGUF (both dequantize to f32), same prompts, same thread count (2), one run:
prefill wall time of a ~2K- and a ~7K-token prompt, then 64 greedy decode tokens.
Writes bench/results/cpu-smollm2-<date>.{json,md} with command, commit, date, machine.

Usage: bench/run_cpu.sh  (makes the reference venv, builds apb in release mode, runs this)
"""
import json, os, platform, random, subprocess, sys, time, datetime
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

THREADS = 2
NEW_TOKENS = 64
REPEATS = 2  # best of


def words_prompt(n_words, seed):
    rng = random.Random(seed)
    vocab = ("the of and to in is was for that with as on by at from his her they were which "
             "river mountain city garden library winter summer market music letter window bridge "
             "quiet ancient bright silver golden morning evening story number seven twelve ").split()
    out = []
    for i in range(n_words):
        out.append(rng.choice(vocab))
        if i % 17 == 16:
            out.append(".")
    return " ".join(out)


def torch_run(model, ids):
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t1
    return prefill * 1e3, (NEW_TOKENS - 1) / decode


def apb_run(apb, gguf, prompt_file):
    cmd = [apb, "generate", "-m", gguf, "--prompt-file", prompt_file, "--max-new-tokens", str(NEW_TOKENS),
           "--ignore-eos", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    v = json.loads(res.stdout)
    assert v["generated_tokens"] == NEW_TOKENS, v
    return v["prefill_ms"], v["decode_tokens_per_s"], v["prompt_tokens"]


def main():
    apb, gguf, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(THREADS)
    d, f = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    rows = []
    for target, n_words in [("2K", 1750), ("7K", 6100)]:
        text = words_prompt(n_words, seed=len(target) + n_words)
        pf = os.path.join(outdir, f"prompt-{target}.txt")
        with open(pf, "w") as fh:
            fh.write(text)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        best_t = min((torch_run(model, ids) for _ in range(REPEATS)), key=lambda r: r[0])
        best_a = min((apb_run(apb, gguf, pf) for _ in range(REPEATS)), key=lambda r: r[0])
        assert best_a[2] == ids.shape[1], (best_a[2], ids.shape[1])
        rows.append({
            "prompt": target, "prompt_tokens": ids.shape[1],
            "apb_prefill_ms": best_a[0], "torch_prefill_ms": best_t[0],
            "prefill_speedup": best_t[0] / best_a[0],
            "apb_decode_tok_s": best_a[1], "torch_decode_tok_s": best_t[1],
            "decode_speedup": best_a[1] / best_t[1],
        })
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + ("-dirty" if dirty else ""),
        "command": "bench/run_cpu.sh",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "threads": THREADS, "new_tokens": NEW_TOKENS, "repeats": f"best of {REPEATS}",
        "model": f, "dtype": "f32 (weights dequantized by both)",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
    }
    day = meta["date"][:10]
    with open(os.path.join(outdir, f"cpu-smollm2-{day}.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    lines = [f"# CPU: apb vs PyTorch, SmolLM2-135M-Instruct ({day})", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| prompt | tokens | apb prefill ms | torch prefill ms | prefill speedup | apb decode tok/s | torch decode tok/s | decode speedup |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['prompt_tokens']} | {r['apb_prefill_ms']:.0f} | {r['torch_prefill_ms']:.0f} | "
                     f"{r['prefill_speedup']:.2f}x | {r['apb_decode_tok_s']:.1f} | {r['torch_decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x |")
    with open(os.path.join(outdir, f"cpu-smollm2-{day}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
