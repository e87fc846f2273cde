#!/usr/bin/env bash
# The official OpenAI Python client (PyPI `openai`, pinned with hashes in openai-requirements.txt)
# against the real `apb serve` on the default model: chat, streaming, completions, models, errors.
# Part of the test command (scripts/test.sh). The client lives in a virtualenv under $APB_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${APB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apb-rs}"
venv="$cache/venv-openai"
stamp="$venv/.requirements.sha256"
want=$(sha256sum scripts/openai-requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r scripts/openai-requirements.txt
  echo "$want" > "$stamp"
fi
cargo build -q --locked -p apb-host --bin apb
log=$(mktemp)
"${CARGO_TARGET_DIR:-target}"/debug/apb serve --port 0 --api-key sekret 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 600); do
  grep -q '^ready:' "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; echo "apb serve exited"; exit 1; }
  sleep 0.2
done
grep -q '^ready:' "$log" || { cat "$log"; echo "apb serve not ready"; exit 1; }
base=$(sed -n 's/^listening on //p' "$log" | head -n1)
"$venv/bin/python" scripts/openai_client_test.py "$base"
