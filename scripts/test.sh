#!/usr/bin/env bash
# The test command (README; CI runs exactly this): fetch the default model once, check
# formatting and lints, run every test of the workspace on CPU, compile our CUDA kernels with nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# Our CUDA kernels compile (nvcc from PyPI; no GPU needed).
./scripts/check-cuda-kernels.sh
