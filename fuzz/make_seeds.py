#!/usr/bin/env python3
"""Seed corpora for the fuzz targets, made from the golden fixtures.

Safetensors seeds keep each golden header's names and dtypes but shrink every tensor to one
element, so they stay small and valid; index and adapter-config seeds are the golden files.
Run from fuzz/:  python3 make_seeds.py
"""
import json, os, struct, glob

G = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "golden")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
SIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "U8": 1, "I64": 8}


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


for i, path in enumerate(sorted(glob.glob(os.path.join(G, "**", "*.safetensors"), recursive=True))):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    small, off = {}, 0
    for k, v in list(header.items())[:12]:
        if k == "__metadata__":
            small[k] = v
            continue
        size = SIZE.get(v["dtype"], 1)
        small[k] = {"dtype": v["dtype"], "shape": [1], "data_offsets": [off, off + size]}
        off += size
    js = json.dumps(small, separators=(",", ":")).encode()
    js += b" " * (-(8 + len(js)) % 8)
    put("safetensors_header", f"golden{i}", struct.pack("<Q", len(js)) + js + b"\0" * off)

for i, path in enumerate(sorted(glob.glob(os.path.join(G, "**", "*.index.json"), recursive=True))):
    put("index_json", f"golden{i}", open(path, "rb").read())

for i, path in enumerate(sorted(glob.glob(os.path.join(G, "**", "adapter_config.json"), recursive=True))):
    put("adapter_config", f"golden{i}", open(path, "rb").read())
