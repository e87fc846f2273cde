#!/usr/bin/env bash
# Regenerates tests/fixtures/ with HF transformers (CPU). Needs network to PyPI the first time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="${APB_REF_VENV:-$HOME/.cache/apb-ref-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers gguf safetensors numpy accelerate
fi
"$here/../fetch-model.sh" >&2
cache="${APB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apb-rs}"
"$venv/bin/python" "$here/make_fixtures.py" "$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
"$venv/bin/python" "$here/heads_dtypes.py"
"$venv/bin/python" "$here/yarn_fixtures.py"
