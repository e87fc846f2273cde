#!/usr/bin/env bash
# On one GPU (run through scripts/device-run.sh): what `apb serve` adds to the time to first token
# of a 32K-token prompt. Model: Llama-3.1-8B shapes with random bf16 weights (made here with
# PyTorch) and the default model's real 49K BPE tokenizer (dist/tokenizer.json, from
# examples/export_tokenizer.rs). Measured, all dense on the same GPU:
#   - `apb generate` (fresh process each, so its first prefill includes CUDA warm-up), twice;
#   - the server: each request's wall time through HTTP (non-streaming, max_tokens 1, so the
#     response is the first token) next to the engine's own prefill_ms for it (what generate
#     reports), after one warm-up request.
# Writes $OUT/serve-overhead.json.
set -euo pipefail
APB=${APB:-/tmp/apb-bin/apb}
W=${W:-$PWD/.cache/llama8b-random}
mkdir -p "$W"
python3 scripts/random_llama.py llama-3.1-8b "$W"
cp dist/tokenizer.json "$W/tokenizer.json"
doc="$W/doc-32k.txt"
python3 - "$doc" <<'PY'
import random, sys
random.seed(7)
words = ("the river runs past old mill into valley farmers bring apples pears market every saturday "
         "library on hill keeps maps from three centuries cold wind came down mountains during night").split()
open(sys.argv[1], "w").write(" ".join(random.choice(words) for _ in range(31500)))
PY
gen() { $APB generate -m "$W" --device cuda --dtype bf16 --prompt-file "$doc" --max-new-tokens 1 --ignore-eos --json; }
g1=$(gen); g2=$(gen)
port=18080
$APB serve -m "$W" --device cuda --dtype bf16 --port $port 2> "$OUT/serve-stderr.txt" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 900); do grep -q '^ready:' "$OUT/serve-stderr.txt" && break; sleep 0.2; done
python3 - "$port" "$doc" "$g1" "$g2" "$OUT/serve-overhead.json" <<'PY'
import http.client, json, os, statistics, subprocess, sys, time
port, doc, g1, g2, out = sys.argv[1:]
text = open(doc).read()
body = json.dumps({"prompt": text, "max_tokens": 1, "ignore_eos": True})
def request():
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=900)
    t = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    dt = (time.perf_counter() - t) * 1e3
    assert r.status == 200, data
    v = json.loads(data)
    return {"client_ms": dt, "engine_prefill_ms": v["apb"]["prefill_ms"],
            "prompt_tokens": v["usage"]["prompt_tokens"]}
warm = request()
runs = [request() for _ in range(5)]
client = statistics.median(r["client_ms"] for r in runs)
engine = statistics.median(r["engine_prefill_ms"] for r in runs)
gens = [json.loads(g.strip().splitlines()[-1]) for g in (g1, g2)]
gen_best = min(g["prefill_ms"] for g in gens)
res = {
    "what": "time to first token of a 32K-token prompt, dense, Llama-3.1-8B shapes (random bf16 weights), SmolLM2 BPE tokenizer",
    "device": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip(),
    "commit": os.environ.get("COMMIT", "unknown"),
    "date": time.strftime("%Y-%m-%d"),
    "command": "scripts/device-run.sh scripts/device-serve.sh",
    "prompt_tokens": runs[0]["prompt_tokens"],
    "generate_prefill_ms": [g["prefill_ms"] for g in gens],
    "server_warmup": warm,
    "server_runs": runs,
    "server_client_ms_median": client,
    "server_engine_prefill_ms_median": engine,
    "server_overhead_pct": 100 * (client - engine) / engine,
    "server_vs_generate_pct": 100 * (client - gen_best) / gen_best,
}
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res, indent=1))
PY
