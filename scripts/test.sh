#!/usr/bin/env bash
# The test command (README; CI runs exactly this): fetch the default model once, check
# formatting and lints, run every test of the workspace on CPU (doctests included), build the docs,
# package the library crates, the OpenAI Python client against
# `apb serve`, compile our CUDA kernels with nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each step's wall time goes to the log (CI keeps the whole command under 30 minutes).
start=$SECONDS
step() {
  local t=$SECONDS
  "$@"
  echo "test.sh: $1 ${2:-} took $((SECONDS - t)) s ($((SECONDS - start)) s in all)"
}
step ./scripts/fetch-model.sh
step cargo fmt --all -- --check
step cargo clippy --workspace --all-targets --locked -- -D warnings
step cargo clippy --locked -p apb-host --all-targets --features fault-injection -- -D warnings
# (Also runs examples/own-model: a host that is not ours wires apb-plugin into its own model,
# exact methods must equal dense.)
step cargo test --workspace --locked
# The failure tests need the fault hooks, which production builds leave out (a panicking thread
# rank; a rank process stalled in the host communicator).
step cargo test --locked -p apb-host --features fault-injection --test server --test processes -- a_failed_rank fault_
# The API docs build without warnings (broken or private links), and the library crates package.
RUSTDOCFLAGS="-D warnings" step cargo doc --no-deps --workspace --locked
step ./scripts/check-package.sh
# The official OpenAI Python client against the real server.
step ./scripts/openai-client-test.sh
# Our CUDA kernels compile (nvcc from PyPI; no GPU needed).
step ./scripts/check-cuda-kernels.sh
