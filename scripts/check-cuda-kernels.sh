#!/usr/bin/env bash
# Compiles our CUDA kernels (kernels/src/*.cu) with nvcc from PyPI (scripts/cuda-env.sh) to the
# fatbins the `cuda` build makes (sm_80 and sm_90 SASS, compute_80 PTX), printing registers and
# spills per kernel for sm_90;
# the cuDNN attention shim (kernels/src/cudnn_sdpa.cpp) with g++, and the FlashInfer wrapper
# (kernels/src/flashinfer_sm90.cu) for sm_90a.
# Part of the CI test command: a CUDA C++ error fails CI although CI has no GPU. (The whole
# `--features cuda` Rust build is not part of CI: candle's own kernels take ~10 min to compile on
# 2 cores; scripts/pack-device.sh builds it before every device run.)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-env.sh
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The compiles run side by side (each nvcc is one thread; FlashInfer's ~90 s is the longest).
# kernels/build.rs FATBIN_TARGETS: SASS for sm_80 and sm_90, PTX for other GPUs.
targets=(-gencode=arch=compute_80,code=[sm_80,compute_80] -gencode=arch=compute_90,code=sm_90)
pids=()
for f in kernels/src/{attention,layout,linear,norm,select}.cu; do
  n=$(basename "$f" .cu)
  (
    nvcc --fatbin -O3 -std=c++17 -lineinfo "${targets[@]}" --resource-usage "$f" -o "$out/$n.fatbin" 2>&1 \
      | grep -E "Compiling entry|registers|spill" | paste - - - | grep "for 'sm_90'" \
      | sed -E "s/ptxas info *: //g; s/\s+/ /g; s/Function properties for [a-z0-9_]+//" \
      | awk -v n="$n" '{print "  " n ": " $0}' > "$out/$n.usage"
  ) &
  pids+=($!)
done
# The cuDNN attention shim (host C++ against the pinned cuDNN frontend headers), as build.rs does.
g++ -std=c++17 -O1 -c -DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING -DCUDNN_FRONTEND_SKIP_JSON_LIB \
  -I "$APB_CUDNN_INCLUDE" -I "$CUDA_HOME/include" kernels/src/cudnn_sdpa.cpp -o "$out/cudnn_sdpa.o" &
pids+=($!)
# FlashInfer's Hopper prefill wrapper (sm_90a SASS, ~90 s), with the flags kernels/build.rs uses.
fi="$APB_FLASHINFER"
nvcc -std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
  --expt-extended-lambda -use_fast_math -static-global-template-stub=false \
  -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DFLASHINFER_ENABLE_F16 -DFLASHINFER_ENABLE_BF16 \
  -I"$fi/cccl/cub" -I"$fi/cccl/libcudacxx/include" -I"$fi/cccl/thrust" \
  -isystem "$fi/include" -isystem "$fi/cutlass/include" -isystem "$fi/cutlass/tools/util/include" \
  -c kernels/src/flashinfer_sm90.cu -o "$out/flashinfer_sm90.o" &
pids+=($!)
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
cat "$out"/*.usage 2>/dev/null || true
[ "$failed" = 0 ] || { echo "error: a CUDA compile failed (above)" >&2; exit 1; }
echo "CUDA kernels compile (SASS sm_80 and sm_90, PTX compute_80), cuDNN shim and FlashInfer wrapper compile"
