#!/usr/bin/env bash
# Everything the GPU path checks and times, in stages, on the device (through
# scripts/device-run.sh, which unpacks dist/ and sets the library path). Each stage writes
# $OUT/<stage>.log; a summary goes to stdout.
#   tests    kernel tests (GPU vs CPU reference), CUDA-vs-CPU generation smoke incl. 2-GPU NCCL ranks
#   ktests   the kernel tests alone (one GPU)
#   smollm2  SmolLM2 GGUF (dist/smollm2.gguf.xz.part-*, possibly carried over several calls): APB on 2 GPUs vs CPU
#   kernel   attention alone: ours (FlashInfer, cuDNN, our mma.sync kernel) vs PyTorch SDPA
#            flash / cuDNN / default, 8K-128K, d128 and d64
#   dense    dense 1-GPU prefill 32K-128K: ours (both kernels) vs HF transformers default
#   gputests the GPU tests of the methods alone (the first half of `methods`)
#   methods  NCCL send/recv on one rank (and between two GPUs where there are two); ring / zigzag / ulysses as thread ranks on the GPU
#            against dense; one rank's share of a 4-rank 128K prefill of every method (--only-rank)
#   apbrank  one GPU: rank 3's share of a 4-rank 128K apb / star / ring prefill (--only-rank 3)
#   prefill  apb bench prefill: dense (1 GPU) vs ring / star / apb on all GPUs, 32K-128K, breakdown
#   long     the same at 256K (all four) and 512K (ring / star / apb; dense alone takes ~4 min)
# Usage: scripts/device-run.sh scripts/device-gpu.sh STAGE...
set -u
OUT="${OUT:-/tmp/apb-out}"
APB=/tmp/apb-bin/apb
fail=0
# The SmolLM2 file travels in parts over separate calls (64 MiB per call): keep what arrived.
mkdir -p /tmp/smol-parts && cp dist/smollm2.gguf.xz.part-* /tmp/smol-parts/ 2>/dev/null
stage() { # name timeout cmd...
  local name=$1 t=$2; shift 2
  echo "== $name"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "== $name rc=$rc"
  [ $rc -eq 0 ] || fail=1
}
for s in "$@"; do
  case $s in
    tests|ktests)
      xz -dc dist/apb-kernels-tests.xz > /tmp/apb-bin/apb-kernels-tests && chmod +x /tmp/apb-bin/apb-kernels-tests
      stage kernel-tests 300 /tmp/apb-bin/apb-kernels-tests --test-threads 1 --nocapture
      [ "$s" = ktests ] || stage smoke 400 bash scripts/device-smoke.sh ;;
    smollm2)
      cat /tmp/smol-parts/smollm2.gguf.xz.part-* | xz -dc > /tmp/smollm2.gguf || true
      stage smollm2 300 bash scripts/device-smollm2.sh /tmp/smollm2.gguf ;;
    kernel)
      # Attention alone, 8K/32K/128K x d128/d64: ours as dispatched (FlashInfer's kernel on
      # Hopper), with cuDNN's, with our own mma.sync kernel, and PyTorch SDPA flash / cuDNN /
      # default, one after the other.
      stage attention-ours 300 $APB bench attention
      APB_ATTENTION=cudnn stage attention-cudnn 300 $APB bench attention
      APB_ATTENTION=mma stage attention-mma 300 $APB bench attention
      stage torch-attention 300 python3 bench/torch_peer.py --skip-prefill ;;
    dense)
      # Dense 1-GPU prefill of Llama-3.1-8B shapes: ours (as dispatched, with cuDNN's kernel, with
      # our own) and HF transformers with its default attention.
      stage dense-ours 300 $APB bench prefill --config llama-3.1-8b --lengths 32768,65536,131072 \
        --attention dense --world-size 1 --breakdown --json "$OUT/dense-ours.json"
      APB_ATTENTION=cudnn stage dense-cudnn 300 $APB bench prefill --config llama-3.1-8b \
        --lengths 32768,65536,131072 --attention dense --world-size 1 --json "$OUT/dense-cudnn.json"
      APB_ATTENTION=mma stage dense-mma 300 $APB bench prefill --config llama-3.1-8b \
        --lengths 32768,65536,131072 --attention dense --world-size 1 --json "$OUT/dense-mma.json"
      stage torch-prefill 400 python3 bench/torch_peer.py --skip-attention ;;
    gputests|methods)
      tests="nccl_one_gpu gpu_methods"
      # Two NCCL ranks need two GPUs (NCCL refuses two ranks on one device).
      [ "$(nvidia-smi -L | wc -l)" -gt 1 ] && tests="$tests nccl_two_gpus"
      for t in $tests; do
        xz -dc "dist/$t.xz" > "/tmp/apb-bin/$t" && chmod +x "/tmp/apb-bin/$t"
        APB_REPO_ROOT=$PWD stage "$t" 300 "/tmp/apb-bin/$t" --test-threads 1 --nocapture
      done
      [ "$s" = gputests ] && continue
      # Ranks 0 and 3 of 4: zigzag's shares are equal, ring's grow with the rank.
      for h in 0 3; do
        stage "methods-rank$h" 400 $APB bench prefill --config llama-3.1-8b --lengths 131072 \
          --attention zigzag,ulysses,ring,apb --world-size 4 --only-rank $h --breakdown \
          --json "$OUT/methods-rank$h.json"
      done ;;
    apbrank)
      # Rank 3's share of a 4-rank 128K prefill on this one GPU (apb bench prefill --only-rank):
      # as dispatched, and with our mma.sync kernel (comparable with the 4-GPU per-rank times).
      stage apb-rank3 300 $APB bench prefill --config llama-3.1-8b --lengths 131072 \
        --attention apb,star,ring --world-size 4 --only-rank 3 --breakdown --json "$OUT/apb-rank3.json"
      APB_ATTENTION=mma stage apb-rank3-mma 300 $APB bench prefill --config llama-3.1-8b \
        --lengths 131072 --attention apb --world-size 4 --only-rank 3 --breakdown \
        --json "$OUT/apb-rank3-mma.json" ;;
    prefill)
      n=$(nvidia-smi -L | wc -l); methods=dense,ring,star,apb
      [ "$n" -gt 1 ] || methods=dense  # one GPU: only dense is meaningful
      stage prefill 560 $APB bench prefill --config llama-3.1-8b --lengths 32768,65536,131072 \
        --attention $methods --world-size "$n" --breakdown --json "$OUT/prefill.json" ;;
    long)
      n=$(nvidia-smi -L | wc -l)
      [ "$n" -gt 1 ] || { echo "long: needs several GPUs"; fail=1; continue; }
      stage prefill-256k 400 $APB bench prefill --config llama-3.1-8b --lengths 262144 \
        --attention dense,ring,star,apb --world-size "$n" --json "$OUT/prefill-256k.json"
      stage prefill-512k 400 $APB bench prefill --config llama-3.1-8b --lengths 524288 \
        --attention apb,star,ring --world-size "$n" --json "$OUT/prefill-512k.json" ;;
    *) echo "unknown stage $s"; fail=1 ;;
  esac
done
# The device tool brings back at most 8 files: everything in one archive.
tar -C "$OUT" -czf /tmp/apb-results.tgz . && rm -rf "${OUT:?}"/* && mv /tmp/apb-results.tgz "$OUT/results.tgz"
exit $fail
