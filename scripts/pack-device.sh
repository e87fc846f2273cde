#!/usr/bin/env bash
# Builds `apb` with CUDA (scripts/cuda-env.sh) and packs it, the default model and the device-side
# runner into dist/ (git-ignored) for the GPU machine (device tool: carry ["dist"]).
set -euo pipefail
cd "$(dirname "$0")/.."
# The default model's real BPE tokenizer for scripts/device-serve.sh (random-weight 8B model dir);
# built before the CUDA environment, which would change the CPU build's flags.
mkdir -p dist
cargo run -q --locked -p apb-examples --example export_tokenizer -- dist/tokenizer.json
# The default model's metadata without its tensors, for `-m random:PRESET` (scripts/device-bench-serve.sh).
python3 scripts/gguf_metadata_only.py "${APB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apb-rs}/models/SmolLM2-135M-Instruct.Q4_1.gguf" dist/smollm2-metadata.gguf
source scripts/cuda-env.sh
# With the fault hooks: scripts/device-smoke.sh makes a rank hang or exit.
cargo build --release --locked --features cuda,fault-injection -p apb-host --target-dir target/cuda
mkdir -p dist
strip -o dist/apb target/cuda/release/apb
xz -f -T2 -6 dist/apb
# The kernels' own tests (GPU vs CPU reference), run on the device by scripts/device-smoke.sh.
tests=$(cargo test --release --locked --features cuda -p apb-kernels --target-dir target/cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable") and m.get("target",{}).get("name")=="apb_kernels"]' | tail -n 1)
strip -o dist/apb-kernels-tests "$tests"
xz -f -T2 -6 dist/apb-kernels-tests
# The GPU tests of the methods: NCCL point-to-point on one rank, thread ranks on one GPU.
for spec in "apb-plugin nccl_one_gpu" "apb-plugin nccl_two_gpus" "apb-integration-tests gpu_methods"; do
  set -- $spec
  bin=$(cargo test --release --locked --features cuda -p "$1" --test "$2" --target-dir target/cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable")]' | tail -n 1)
  strip -o "dist/$2" "$bin"
  xz -f -T2 -6 "dist/$2"
done
ls -la dist
