"""Tables for the Hopper attention / dense prefill results of one device call.

Reads the stage logs and JSON that `scripts/device-gpu.sh ktests kernel dense apbrank` leaves in
its output folder and prints Markdown tables (attention TFLOP/s of each kernel against PyTorch
SDPA's flash / cuDNN / default backends; dense prefill against HF transformers; the one-GPU APB
rank share) plus one JSON object with every number, for bench/results/.

Usage: python3 bench/hopper_report.py OUT_DIR [--json FILE]
"""
import argparse, json, pathlib


def json_lines(path):
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--json")
    a = ap.parse_args()
    d = pathlib.Path(a.out)
    ours = {}
    for kernel_log in ("attention-ours", "attention-cudnn", "attention-mma"):
        for r in json_lines(d / f"{kernel_log}.log"):
            ours[(kernel_log, r["seq"], r["head_dim"])] = r
    torch_att = json_lines(d / "torch-attention.log")[0]
    peer = {(r["backend"], r["seq"], r["head_dim"]): r for r in torch_att["attention"]}
    print(f"PyTorch {torch_att['torch']}, cuDNN {torch_att['cudnn']}, {torch_att['device']}\n")
    print("| head_dim | seq | ours as dispatched (kernel) | ours, cuDNN | ours, mma.sync (previous) "
          "| SDPA flash (pinned) | SDPA cuDNN (pinned) | SDPA default | ours / default | ours / cuDNN |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for (log, seq, hd), r in sorted(ours.items(), key=lambda x: (-x[0][2], x[0][1])):
        if log != "attention-ours":
            continue
        c = ours[("attention-cudnn", seq, hd)]["tflops"]
        m = ours[("attention-mma", seq, hd)]["tflops"]
        f, n, dflt = (peer[(b, seq, hd)].get("tflops") for b in ("flash", "cudnn", "default"))
        print(f"| {hd} | {seq // 1024}K | **{r['tflops']:.0f}** ({r['kernel']}) | {c:.0f} | {m:.0f} | "
              f"{f:.0f} | {n:.0f} | {dflt:.0f} | {r['tflops'] / dflt:.2f}× | {r['tflops'] / n:.2f}× |")
        rows.append(dict(seq=seq, head_dim=hd, ours=r["tflops"], ours_kernel=r["kernel"], ours_cudnn=c,
                         ours_mma=m, sdpa_flash=f, sdpa_cudnn=n, sdpa_default=dflt))
    res = dict(torch=torch_att["torch"], cudnn=torch_att["cudnn"], device=torch_att["device"],
               attention_tflops=rows)
    dense = {k: json.loads((d / f"dense-{k}.json").read_text()) for k in ("ours", "cudnn", "mma")}
    hf = json_lines(d / "torch-prefill.log")[0]["dense_prefill"]
    hf_s = {r["length"]: r["wall_s"] for r in hf["results"]}
    print(f"\nPeer: {hf['peer']}. GEMM peak in our run: {dense['ours']['gemm_peak_tflops']:.0f} TFLOP/s.\n")
    print("| tokens | ours (s) | ours, cuDNN (s) | ours, mma.sync (s) | HF transformers default (s) "
          "| ours / HF speed | ours MFU |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    res["dense"] = []
    for r in dense["ours"]["results"]:
        n = r["length"]
        c = next(x["wall_s"] for x in dense["cudnn"]["results"] if x["length"] == n)
        m = next(x["wall_s"] for x in dense["mma"]["results"] if x["length"] == n)
        print(f"| {n // 1024}K | **{r['wall_s']:.3f}** | {c:.3f} | {m:.3f} | {hf_s[n]:.3f} | "
              f"{hf_s[n] / r['wall_s']:.2f}× | {100 * r['mfu']:.1f} % |")
        res["dense"].append(dict(length=n, ours_s=r["wall_s"], ours_cudnn_s=c, ours_mma_s=m, hf_s=hf_s[n],
                                 mfu=r["mfu"], breakdown_s=r.get("breakdown_s")))
    print("\nBreakdown of ours (s, synchronised per part):\n")
    print("| tokens | " + " | ".join(dense["ours"]["breakdown_buckets"]) + " |")
    print("|---:|" + "---:|" * len(dense["ours"]["breakdown_buckets"]))
    for r in dense["ours"]["results"]:
        b = r["breakdown_s"]
        print(f"| {r['length'] // 1024}K | " + " | ".join(f"{b[k]:.3f}" for k in dense["ours"]["breakdown_buckets"]) + " |")
    res["hf_peer"] = hf["peer"]
    rank = {k: json.loads((d / f"apb-rank3{k}.json").read_text()) for k in ("", "-mma")}
    print(f"\nOne GPU, rank 3's share of a 4-rank 128K prefill (communication excluded); GEMM peak "
          f"{rank['']['gemm_peak_tflops']:.0f} TFLOP/s:\n")
    print("| method | kernel | wall (s) | TFLOP/s | MFU | attention (s) | ffn (s) | qkv (s) | o_proj (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    res["rank3"] = []
    for k, label in (("", "as dispatched"), ("-mma", "mma.sync")):
        for r in rank[k]["results"]:
            b = r["breakdown_s"]
            print(f"| {r['attention']} | {label} | {r['wall_s']:.3f} | {r['slowest_rank_tflops']:.0f} | "
                  f"{100 * r['mfu']:.1f} % | {b['attention']:.3f} | {b['ffn']:.3f} | {b['qkv']:.3f} | "
                  f"{b['o_proj']:.3f} |")
            res["rank3"].append(dict(method=r["attention"], kernel=label, wall_s=r["wall_s"],
                                     tflops=r["slowest_rank_tflops"], mfu=r["mfu"], breakdown_s=b,
                                     plan=r["plan"]))
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
