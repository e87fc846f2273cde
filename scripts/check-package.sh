#!/usr/bin/env bash
# Packaging check (CI, no publishing): every library crate packages in dependency order with
# versions on its path dependencies and nothing huge inside, and the leaf crate (apb-kernels, no
# sibling dependencies) builds from its package alone. The others cannot be verified against the
# registry before their siblings are published there.
set -euo pipefail
cd "$(dirname "$0")/.."
crates=(-p apb-kernels -p apb-plugin -p apb-loaders -p apb-host)
cargo package "${crates[@]}" --no-verify --locked
for f in "${CARGO_TARGET_DIR:-target}"/package/apb-{kernels,plugin,loaders,host}-*.crate; do
  size=$(stat -c %s "$f")
  echo "$f: $size bytes"
  [ "$size" -lt 2000000 ] || { echo "error: $f is over 2 MB: check cargo package --list" >&2; exit 1; }
done
cargo package -p apb-kernels --locked
