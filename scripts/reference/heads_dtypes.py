#!/usr/bin/env python3
"""bf16 and f16 variants of tests/fixtures/heads/heads.pt (Python standard library only).

Rewrites the torch.save zip: the storage class becomes torch.BFloat16Storage / torch.HalfStorage,
each storage is rounded to that type (bf16: round to nearest even; f16: struct's IEEE half), and an
extra tensor under a key without "fc" (thunlp's files carry more than the heads; loaders keep keys
containing "fc") is added. The same rounded tensors are written as safetensors, so a test can check
that the pickle's half storages decode exactly like safetensors' halves.
"""
import json
import os
import struct
import zipfile

FIX = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "heads")


def bf16(raw: bytes) -> bytes:
    out = bytearray()
    for (bits,) in struct.iter_unpack("<I", raw):
        bits += 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
        out += struct.pack("<H", (bits >> 16) & 0xFFFF)
    return bytes(out)


def f16(raw: bytes) -> bytes:
    return b"".join(struct.pack("<e", x) for (x,) in struct.iter_unpack("<f", raw))


def extra_entry(storage_global: bytes) -> bytes:
    """key 'model.embed_tokens.weight' -> a (64, 64) tensor over storage '0' (pickle protocol 2),
    built from memo entries the file already has: 2 = _rebuild_tensor_v2, 3 = 'storage',
    4 = the storage class, 6 = 'cpu', 10 = OrderedDict."""
    def uni(s: str) -> bytes:
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b
    return (uni("model.embed_tokens.weight") + b"h\x02" + b"(" + b"(" + b"h\x03h\x04" + uni("0")
            + b"h\x06" + b"M" + struct.pack("<H", 4096) + b"t" + b"Q" + b"K\x00"
            + b"K\x40K\x40\x86" + b"K\x40K\x01\x86" + b"\x89" + b"h\x0a)R" + b"t" + b"R")


def variant(name: str, cls: bytes, conv, st_dtype: str):
    src = zipfile.ZipFile(os.path.join(FIX, "heads.pt"))
    pkl = src.read("heads/data.pkl")
    assert pkl.count(b"ctorch\nFloatStorage\n") == 1
    pkl = pkl.replace(b"ctorch\nFloatStorage\n", b"ctorch\n" + cls + b"\n")
    assert pkl.endswith(b"u."), "dict items end with SETITEMS, STOP"
    pkl = pkl[:-2] + extra_entry(cls) + b"u."
    keys = {}  # storage key -> rounded bytes
    with zipfile.ZipFile(os.path.join(FIX, f"heads-{name}.pt"), "w", zipfile.ZIP_STORED) as out:
        for n in src.namelist():
            data = src.read(n)
            if n == "heads/data.pkl":
                data = pkl
            elif n.startswith("heads/data/"):
                data = conv(data)
                keys[n.rsplit("/", 1)[1]] = data
            out.writestr(n, data)
    # The same tensors as safetensors (shapes from the f32 fixture).
    st = open(os.path.join(FIX, "heads.safetensors"), "rb").read()
    hlen = struct.unpack("<Q", st[:8])[0]
    header = json.loads(st[8:8 + hlen])
    # heads.pt's storages 0..3 hold the tensors in key order (layer 0 fc1, fc2, layer 1 fc1, fc2).
    order = ["model.layers.0.self_attn.fc1.weight", "model.layers.0.self_attn.fc2.weight",
             "model.layers.1.self_attn.fc1.weight", "model.layers.1.self_attn.fc2.weight"]
    new_header, blob = {}, b""
    for i, k in enumerate(order):
        data = keys[str(i)]
        new_header[k] = {"dtype": st_dtype, "shape": header[k]["shape"],
                         "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    h = json.dumps(new_header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(FIX, f"heads-{name}.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + blob)
    print("wrote", name)


if __name__ == "__main__":
    variant("bf16", b"BFloat16Storage", bf16, "BF16")
    variant("f16", b"HalfStorage", f16, "F16")
