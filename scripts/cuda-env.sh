#!/usr/bin/env bash
# Sets up a CUDA 13.0 toolchain for `--features cuda` builds on a machine without a GPU (see
# README, GPU section): nvcc and headers from PyPI, plus stub shared libraries with the right
# SONAMEs for the link (the real libcuda/cuBLAS/NCCL are loaded on the GPU machine).
# Usage: source scripts/cuda-env.sh   (idempotent; installs under ~/.cache/apb-cuda)
set -euo pipefail
CUDA_PREFIX="${APB_CUDA_PREFIX:-$HOME/.cache/apb-cuda}"
if [ ! -x "$CUDA_PREFIX/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$CUDA_PREFIX" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88
fi
export CUDA_HOME="$CUDA_PREFIX/nvidia/cu13"
export CUDA_PATH="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP=90
stubs="$CUDA_HOME/lib/stubs"
mkdir -p "$stubs"
# One empty function per symbol is enough for the linker; cudarc loads the real libraries.
make_stub() { # soname linkname symbols...
  local soname=$1 link=$2; shift 2
  [ -f "$stubs/$soname" ] && return 0
  local c; c=$(mktemp --suffix .c)
  for s in "$@"; do echo "void $s(void) {}" >> "$c"; done
  gcc -shared -fPIC -Wl,-soname,"$soname" "$c" -o "$stubs/$soname"
  ln -sf "$soname" "$stubs/$link"
  rm -f "$c"
}
make_stub libcuda.so.1 libcuda.so cuInit
make_stub libcublas.so.13 libcublas.so cublasCreate_v2
make_stub libcublasLt.so.13 libcublasLt.so cublasLtCreate
make_stub libcurand.so.10 libcurand.so curandCreateGenerator
make_stub libnvrtc.so.13 libnvrtc.so nvrtcVersion
make_stub libnccl.so.2 libnccl.so ncclGetVersion
export LIBRARY_PATH="$stubs:${LIBRARY_PATH:-}"
export RUSTFLAGS="${RUSTFLAGS:-} -L $stubs"
