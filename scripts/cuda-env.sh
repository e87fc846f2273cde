#!/usr/bin/env bash
# Sets up a CUDA 13.0 toolchain for `--features cuda` builds on a machine without a GPU (see
# README, GPU section): nvcc and headers from PyPI, plus stub shared libraries with the right
# SONAMEs for the link (the real libcuda/cuBLAS/NCCL are loaded on the GPU machine).
# Usage: source scripts/cuda-env.sh   (idempotent; installs under ~/.cache/apb-cuda)
_apb_saved_opts=$(set +o)
set -euo pipefail
CUDA_PREFIX="${APB_CUDA_PREFIX:-$HOME/.cache/apb-cuda}"
# nvrtc.h: the cuDNN frontend's headers include it.
if [ ! -x "$CUDA_PREFIX/nvidia/cu13/bin/nvcc" ] || [ ! -f "$CUDA_PREFIX/nvidia/cu13/include/nvrtc.h" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$CUDA_PREFIX" --upgrade \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 nvidia-cuda-nvrtc==13.0.88
fi
# cuDNN headers for the Hopper attention path (kernels/src/cudnn_sdpa.cpp): pinned, hash-checked
# wheels; only their include/ folders are kept.
cudnn_inc="$CUDA_PREFIX/cudnn/include"  # the frontend includes "../include/..."
if [ ! -f "$cudnn_inc/cudnn_frontend.h" ] || [ ! -f "$cudnn_inc/cudnn.h" ]; then
  wheels=$(mktemp -d)
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311 \
    --require-hashes -r "$(dirname "${BASH_SOURCE[0]}")/cudnn-requirements.txt" -d "$wheels"
  python3 - "$wheels" "$cudnn_inc" <<'PY'
import pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for whl in src.glob("*.whl"):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            for prefix in ("include/", "nvidia/cudnn/include/"):
                if name.startswith(prefix) and not name.endswith("/"):
                    out = dst / name[len(prefix):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))
PY
  rm -rf "$wheels"
fi
export APB_CUDNN_INCLUDE="$cudnn_inc"
# FlashInfer's header-only Hopper prefill (kernels/src/flashinfer_sm90.cu): pinned, hash-checked
# wheel; only its include/, cutlass/ and cccl/ folders are kept.
fi_data="$CUDA_PREFIX/flashinfer"
if [ ! -f "$fi_data/include/flashinfer/attention/hopper/prefill_sm90.cuh" ]; then
  wheels=$(mktemp -d)
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r "$(dirname "${BASH_SOURCE[0]}")/flashinfer-requirements.txt" -d "$wheels"
  python3 - "$wheels" "$fi_data" <<'PY'
import pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for whl in src.glob("*.whl"):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            for part in ("include/", "cutlass/", "cccl/"):
                prefix = "flashinfer/data/" + part
                if name.startswith(prefix) and not name.endswith("/"):
                    out = dst / part / name[len(prefix):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))
PY
  rm -rf "$wheels"
fi
export APB_FLASHINFER="$fi_data"
export CUDA_HOME="$CUDA_PREFIX/nvidia/cu13"
export CUDA_PATH="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP=90
stubs="$CUDA_HOME/lib/stubs"
mkdir -p "$stubs"
# One empty function per symbol is enough for the linker; the real libraries are loaded on the
# GPU machine. Symbol names come from cudarc's own FFI declarations (`extern "C" { fn name(`).
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -n 1 || true)
if [ -z "$cudarc" ]; then
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && cargo fetch --locked >/dev/null)
  cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -n 1)
fi
make_stub() { # soname linkname cudarc-module
  local soname=$1 link=$2 module=$3
  [ -f "$stubs/$soname" ] && return 0
  local c; c=$(mktemp --suffix .c)
  grep -ohE '^\s+fn [A-Za-z_][A-Za-z0-9_]*\(' "$cudarc"/src/"$module"/sys/*.rs | sed -E 's/^\s+fn ([A-Za-z0-9_]+)\(/\1/' | sort -u \
    | while read -r s; do echo "void $s(void) {}"; done > "$c"
  gcc -shared -fPIC -Wl,-soname,"$soname" "$c" -o "$stubs/$soname"
  ln -sf "$soname" "$stubs/$link"
  rm -f "$c"
}
make_stub libcuda.so.1 libcuda.so driver
make_stub libcublas.so.13 libcublas.so cublas
make_stub libcublasLt.so.13 libcublasLt.so cublaslt
make_stub libcurand.so.10 libcurand.so curand
make_stub libnvrtc.so.13 libnvrtc.so nvrtc
make_stub libnccl.so.2 libnccl.so nccl
# The runtime comes real from the PyPI wheel; give the linker its unversioned name.
[ -e "$stubs/libcudart.so" ] || ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$stubs/libcudart.so"
export LIBRARY_PATH="$stubs:${LIBRARY_PATH:-}"
export RUSTFLAGS="${RUSTFLAGS:-} -L $stubs"
# Sourced: give the caller its shell options back.
eval "$_apb_saved_opts"
