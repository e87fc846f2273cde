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
# Two checks that share nothing with the test build (the packaged crate's own verify build in its
# own target directory; nvcc) run beside the steps below at the lowest CPU priority: they use the
# CPU those leave idle (tests waiting on sockets, processes and timers; serial link steps), not
# their share. Their logs and times print at the end; either failing fails the command.
bg_dir=$(mktemp -d)
bg_pids=()
# (Not in a session of their own: where the kernel groups CPU time by session (autogroup), a new
# session would get an equal share whatever its nice value. An early exit stops each with all
# its children.)
kill_tree() {
  local c
  for c in $(pgrep -P "$1"); do kill_tree "$c"; done
  kill "$1" 2>/dev/null || true
}
trap 'for p in "${bg_pids[@]}"; do kill_tree "$p"; done; rm -rf "$bg_dir"' EXIT
beside() {
  local name=$1
  shift
  (
    t=$SECONDS
    rc=0
    nice -n 19 "$@" >"$bg_dir/$name.log" 2>&1 || rc=$?
    echo "$rc $((SECONDS - t))" >"$bg_dir/$name.done"
  ) &
  bg_pids+=($!)
}
beside package env CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/package-check" ./scripts/check-package.sh
# Our CUDA kernels compile (nvcc from PyPI; no GPU needed).
beside cuda ./scripts/check-cuda-kernels.sh
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
# The official OpenAI Python client against the real server.
step ./scripts/openai-client-test.sh
# The checks that ran beside: their output, and their status.
t=$SECONDS
wait "${bg_pids[@]}" || true
failed=0
for name in package cuda; do
  echo "--- $name check (ran beside the steps above, nice 19):"
  cat "$bg_dir/$name.log"
  read -r rc took <"$bg_dir/$name.done" || { rc=1; took=?; }
  echo "test.sh: $name check took $took s beside the others (exit $rc)"
  [ "$rc" = 0 ] || failed=1
done
echo "test.sh: waited $((SECONDS - t)) s for them ($((SECONDS - start)) s in all)"
[ "$failed" = 0 ] || { echo "error: a check that ran beside failed (above)" >&2; exit 1; }
