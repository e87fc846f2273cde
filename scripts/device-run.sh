#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there): unpacks dist/apb, finds the CUDA/NCCL libraries of the
# machine's PyTorch install, and runs the GPU checks, writing results under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-/tmp/apb-out}"
mkdir -p "$OUT" /tmp/apb-bin
xz -dc dist/apb.xz > /tmp/apb-bin/apb && chmod +x /tmp/apb-bin/apb
nv=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)
libs=""
for d in "$nv"/nvidia/cu13/lib "$nv"/nvidia/nccl/lib /usr/local/nvidia/lib64 /usr/local/cuda/lib64; do
  [ -d "$d" ] && libs="$libs:$d"
done
export LD_LIBRARY_PATH="${libs#:}:${LD_LIBRARY_PATH:-}"
APB=/tmp/apb-bin/apb
{ nvidia-smi -L; ldd $APB | grep -E "cuda|cublas|nccl|nvrtc|curand"; } > "$OUT/env.txt" 2>&1 || true
"$@"
