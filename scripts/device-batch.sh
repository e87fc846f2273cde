#!/usr/bin/env bash
# On one GPU (through scripts/device-run.sh): continuous batching against one request at a time.
# `apb serve` with Llama-3.1-8B shapes (random bf16 weights made here with PyTorch, the default
# model's tokenizer: dist/tokenizer.json), dense on one GPU, N concurrent requests of P prompt
# tokens and T output tokens (ignore_eos), once with --max-num-seqs 1 (the peer: today's server)
# and once with --max-num-seqs N+8; then, with the N requests decoding, short requests' time to
# first token next to their idle time (the first text chunk of an 8-token request, and the
# median end of 1-token requests: exactly the first token; five back to back, five at random
# moments, each split into waiting and prefill); batched only, six greedy
# requests sent together and then each alone (their texts must match). Writes $OUT/batch.json.
# Usage: N=16 P=2048 T=64 scripts/device-run.sh scripts/device-batch.sh
# SEQS="32" runs only the batched server (default "1 N": the peer, then batched).
set -euo pipefail
APB=${APB:-/tmp/apb-bin/apb}
N=${N:-16}; P=${P:-2048}; T=${T:-64}
W=${W:-$PWD/.cache/llama8b-random}
mkdir -p "$W"
[ -f "$W/config.json" ] || python3 scripts/random_llama.py llama-3.1-8b "$W"
cp dist/tokenizer.json "$W/tokenizer.json"
port=18090
results=()
for seqs in ${SEQS:-1 $N}; do
  # Batched: room for the N requests and the short one sent while they decode.
  cap=$seqs; [ "$seqs" -gt 1 ] && cap=$((N + 8))
  $APB serve -m "$W" --device cuda --dtype bf16 --port $port --max-num-seqs "$cap" --max-queued 256 \
    2> "$OUT/batch-serve-$seqs.txt" &
  pid=$!
  for _ in $(seq 900); do grep -q '^ready:' "$OUT/batch-serve-$seqs.txt" && break; sleep 0.2; done
  python3 - "$port" "$N" "$P" "$T" "$cap" "$OUT/batch-$seqs.json" <<'PY'
import http.client, json, random, statistics, sys, threading, time
port, n, p, t, seqs, out = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
words = ("the river runs past old mill into valley farmers bring apples pears market every saturday "
         "library on hill keeps maps from three centuries cold wind came down mountains during night").split()
def prompt(seed, tokens):
    r = random.Random(seed)
    return " ".join(r.choice(words) for _ in range(int(tokens * 0.95)))
def request(text, max_tokens, res, i):
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=3600)
    body = json.dumps({"prompt": text, "max_tokens": max_tokens, "ignore_eos": True, "stream": True})
    t0 = time.perf_counter(); first = None; chunks = 0
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse(); assert r.status == 200, r.read()
    for line in r:
        if line.startswith(b"data: {") and b'"text"' in line:
            chunks += 1
            if first is None: first = time.perf_counter() - t0
    res[i] = {"ttft_s": first, "e2e_s": time.perf_counter() - t0, "chunks": chunks}
# Warm-up (CUDA init, first kernels).
w = {}; request(prompt(0, 256), 4, w, 0)
res = {}
t0 = time.perf_counter()
th = [threading.Thread(target=request, args=(prompt(i + 1, p), t, res, i)) for i in range(n)]
[x.start() for x in th]
# A short request once all are decoding (one at a time: 0.5 s in, behind the queue): its time to
# first token, against the same request's on an idle server.
time.sleep(0.5)
if seqs > 1:
    for _ in range(600):
        c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
        c.request("GET", "/health")
        if json.loads(c.getresponse().read()).get("running_sequences", 0) >= n:
            break
        time.sleep(0.05)
# Then five requests of max_tokens 1, one after the other: their end is their first token (the
# first text chunk above can come tokens later: ids the tokenizer renders as nothing). Sent back to
# back, each arrives just after the engine answered the one before and started the next decode
# step, so each waits ~a whole step; five more, each after a random 0-30 ms pause, arrive at
# random points of a step (what independent clients see). Their `apb.prefill_ms` (engine start of
# the prefill to its first token) splits the time into waiting for the step and prefill.
def one_token(text, res, i):
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=600)
    body = json.dumps({"prompt": text, "max_tokens": 1, "ignore_eos": True})
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse(); assert r.status == 200, r.read()
    apb = json.loads(r.read()).get("apb", {})
    res[i] = {"e2e_s": time.perf_counter() - t0, "prefill_s": apb.get("prefill_ms", 0) / 1e3}
def shorts(res):
    request(prompt(999, 64), 8, res, 0)
    for k in range(1, 6):
        one_token(prompt(1000 + k, 64), res, k)
    rng = random.Random(7)
    for k in range(6, 11):
        time.sleep(rng.uniform(0, 0.03))
        one_token(prompt(1000 + k, 64), res, k)
short = {}
idle = {}
th.append(threading.Thread(target=shorts, args=(short,))); th[-1].start()
[x.join() for x in th]
wall = time.perf_counter() - t0
# The decode steps of the load alone (before the idle shorts and the invariance check below add
# their own small steps to the same histograms).
c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
c.request("GET", "/metrics"); open(out.replace(".json", "-load-metrics.txt"), "wb").write(c.getresponse().read())
shorts(idle)
# Batch invariance: six greedy requests of different lengths at once, then each alone; on the
# GPU every decode kernel computes a row independently of its neighbours, so the texts must match.
def plain(text, max_tokens, res, i):
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=600)
    body = json.dumps({"prompt": text, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse(); assert r.status == 200, r.read()
    res[i] = json.loads(r.read())["choices"][0]["text"]
invariant = None
if seqs > 1:
    lens = [40, 300, 1200, 77, 2500, 640]
    together, alone = {}, {}
    ts = [threading.Thread(target=plain, args=(prompt(500 + i, l), 48, together, i)) for i, l in enumerate(lens)]
    [x.start() for x in ts]; [x.join() for x in ts]
    for i, l in enumerate(lens):
        plain(prompt(500 + i, l), 48, alone, i)
    invariant = {"requests": len(lens), "equal": sum(together[i] == alone[i] for i in range(len(lens))),
                 "differ": [i for i in range(len(lens)) if together[i] != alone[i]]}
first = lambda d, ks=range(1, 6): statistics.median(d[k]["e2e_s"] for k in ks)
wait = lambda d, ks: statistics.median(d[k]["e2e_s"] - d[k]["prefill_s"] for k in ks)
out_tokens = n * t
r = {"max_num_seqs": seqs, "requests": n, "prompt_tokens": p, "output_tokens": t,
     "wall_s": wall, "output_tokens_per_s": out_tokens / wall,
     "ttft_p50_s": statistics.median(v["ttft_s"] for v in res.values()),
     "ttft_max_s": max(v["ttft_s"] for v in res.values()),
     "e2e_p50_s": statistics.median(v["e2e_s"] for v in res.values()),
     "short_ttft_under_load_s": short[0]["ttft_s"], "short_ttft_idle_s": idle[0]["ttft_s"],
     "short_first_token_under_load_s": first(short), "short_first_token_idle_s": first(idle),
     "short_first_token_under_load_all_s": [short[k]["e2e_s"] for k in range(1, 6)],
     "short_first_token_idle_all_s": [idle[k]["e2e_s"] for k in range(1, 6)],
     "short_first_token_random_arrival_under_load_s": first(short, range(6, 11)),
     "short_first_token_random_arrival_idle_s": first(idle, range(6, 11)),
     "short_random_arrival_under_load_all": [short[k] for k in range(6, 11)],
     "short_wait_under_load_back_to_back_s": wait(short, range(1, 6)),
     "short_wait_under_load_random_arrival_s": wait(short, range(6, 11)),
     "short_wait_idle_s": wait(idle, range(1, 11)),
     "short_prefill_under_load_s": statistics.median(short[k]["prefill_s"] for k in range(1, 11)),
     "short_prefill_idle_s": statistics.median(idle[k]["prefill_s"] for k in range(1, 11)),
     "batched_equals_alone": invariant}
json.dump(r, open(out, "w"), indent=1)
print(json.dumps(r))
PY
  # Decode step times (apb_decode_step_seconds: sum / count is the mean step of this run).
  curl -s "http://127.0.0.1:$port/metrics" > "$OUT/batch-metrics-$seqs.txt" || true
  kill $pid; wait $pid || true
done
# Device copy bandwidth (read + write bytes / s of a 4 GiB device-to-device copy): the roofline's
# denominator.
python3 scripts/copy_bandwidth.py > "$OUT/copy-bandwidth.json"
cat "$OUT/copy-bandwidth.json"
[ -f "$OUT/batch-1.json" ] && [ -f "$OUT/batch-$N.json" ] || exit 0
python3 - "$OUT" "$N" <<'PY'
import json, os, subprocess, sys, time
out, n = sys.argv[1], sys.argv[2]
a, b = (json.load(open(f"{out}/batch-{s}.json")) for s in ("1", n))
res = {"what": "apb serve, dense on one GPU, Llama-3.1-8B shapes (random bf16 weights), SmolLM2 tokenizer",
       "device": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip(),
       "commit": os.environ.get("COMMIT", "unknown"), "date": time.strftime("%Y-%m-%d"),
       "command": "scripts/device-run.sh scripts/device-batch.sh", "one_at_a_time": a, "batched": b,
       "throughput_ratio": b["output_tokens_per_s"] / a["output_tokens_per_s"]}
json.dump(res, open(f"{out}/batch.json", "w"), indent=1)
print(json.dumps(res, indent=1))
PY
