#!/usr/bin/env bash
# The demo (README): fetch the default model, build `apb` in release mode, ask it a question.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
cargo build --release --locked -p apb-host
./target/release/apb generate --prompt "The capital of France is" --max-new-tokens 8 --json
./target/release/apb generate --chat --prompt "Name three primary colors." --max-new-tokens 48
