#!/usr/bin/env bash
# The test command (README; CI runs exactly this): fetch the default model once, check
# formatting and lints, run every test of the workspace on CPU, the OpenAI Python client against
# `apb serve`, compile our CUDA kernels with nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The official OpenAI Python client against the real server.
./scripts/openai-client-test.sh
# Our CUDA kernels compile (nvcc from PyPI; no GPU needed).
./scripts/check-cuda-kernels.sh
