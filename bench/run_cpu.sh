#!/usr/bin/env bash
# CPU benchmark, apb vs PyTorch side by side (see bench/cpu_vs_pytorch.py).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${APB_REF_VENV:-$HOME/.cache/apb-ref-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers gguf safetensors numpy accelerate
fi
./scripts/fetch-model.sh >&2
cargo build --release --locked -p apb-host
cache="${APB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apb-rs}"
mkdir -p bench/results
"$venv/bin/python" bench/cpu_vs_pytorch.py target/release/apb "$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf" bench/results
