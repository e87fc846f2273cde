#!/usr/bin/env bash
# Builds `apb` with CUDA (scripts/cuda-env.sh) and packs it, the default model and the device-side
# runner into dist/ (git-ignored) for the GPU machine (device tool: carry ["dist"]).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-env.sh
cargo build --release --locked --features cuda -p apb-host --target-dir target/cuda
mkdir -p dist
strip -o dist/apb target/cuda/release/apb
xz -f -T2 -6 dist/apb
ls -la dist
