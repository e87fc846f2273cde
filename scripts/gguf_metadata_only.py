#!/usr/bin/env python3
"""Copies a GGUF file's metadata (config, tokenizer, chat template) without its tensors.

For the GPU machine, which cannot download: `apb serve -m random:PRESET` takes the default
model's tokenizer from its GGUF, and the whole file (98 MB) is over what a device call carries;
scripts/device-bench-serve.sh puts this copy where the default model goes.
Usage: gguf_metadata_only.py IN.gguf OUT.gguf
"""
import struct
import sys

SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def skip_value(f, ty):
    if ty in SIZES:
        f.read(SIZES[ty])
    elif ty == 8:  # string: u64 length, bytes
        (n,) = struct.unpack("<Q", f.read(8))
        f.read(n)
    elif ty == 9:  # array: item type, u64 count, items
        item, n = struct.unpack("<IQ", f.read(12))
        if item in SIZES:
            f.read(SIZES[item] * n)
        else:
            for _ in range(n):
                skip_value(f, item)
    else:
        raise SystemExit(f"unknown GGUF value type {ty}")


def main(src, dst):
    with open(src, "rb") as f:
        magic, version, _tensors, kvs = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF" or version < 2:
            raise SystemExit(f"{src}: not a GGUF v2+ file")
        start = f.tell()
        for _ in range(kvs):
            (n,) = struct.unpack("<Q", f.read(8))
            f.read(n)
            (ty,) = struct.unpack("<I", f.read(4))
            skip_value(f, ty)
        end = f.tell()
        f.seek(start)
        body = f.read(end - start)
    with open(dst, "wb") as g:
        g.write(struct.pack("<4sIQQ", b"GGUF", version, 0, kvs))
        g.write(body)
        g.write(b"\0" * (-g.tell() % 32))  # the (empty) tensor data starts aligned
    print(f"{dst}: {kvs} metadata entries, no tensors ({end - start} bytes)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
