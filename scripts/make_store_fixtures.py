#!/usr/bin/env python3
"""Activation stores written by the Python saev's format rules, for saev's reader/writer tests.

Writes tests/fixtures/store/:
  raw.safetensors        the activations [n, n_layers, T, d] (float32) and patch labels (uint8)
  py21/<hash8>/          protocol 2.1 as HEAD saev's shards.py writes it: metadata.json and
                         shards.json via orjson OPT_INDENT_2 (declaration order, no trailing
                         newline), directory = sha256(orjson sorted compact)[:8], every shard a
                         full-size float32 np.memmap, labels.bin uint8 [n, content_tokens]
  paper/<sha256>/        the paper-era layout of PyPI saev==0.1.0 (activations.py): metadata.json
                         via json.dump(indent=4), directory = full sha256 of json.dumps(sort_keys)
  feb2025/<sha256>/      the same layout as the Python saev wrote it from December 2024 to
                         1 March 2025 (commit 43b54ea renamed them back): `model_family` and
                         `model_ckpt` instead of `vit_family` and `vit_ckpt`
Needs numpy, orjson, safetensors. CI never runs this; the outputs are committed.
"""
import dataclasses
import hashlib
import json
import pathlib
import shutil

import numpy as np
import orjson
from safetensors.numpy import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "store"

n, layers, content, cls, d, max_tokens = 7, (-2, -1), 4, True, 8, 30
T = content + int(cls)
rng = np.random.default_rng(0)
acts = rng.standard_normal((n, len(layers), T, d)).astype(np.float32)
labels = rng.integers(0, 5, size=(n, content)).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Metadata:  # field order of saev HEAD's shards.Metadata
    family: str
    ckpt: str
    layers: tuple
    content_tokens_per_example: int
    cls_token: bool
    d_model: int
    n_examples: int
    max_tokens_per_shard: int
    data: str
    dataset: str
    pixel_agg: str = "majority"
    dtype: str = "float32"
    protocol: str = "2.1"

    @property
    def hash(self):
        return hashlib.sha256(orjson.dumps(dataclasses.asdict(self), option=orjson.OPT_SORT_KEYS)).hexdigest()[:8]


def write_21():
    md = Metadata("dinov2", "facebook/dinov2-small", layers, content, cls, d, n, max_tokens, "fixture", "/data/fixture")
    root = OUT / "py21"
    shutil.rmtree(root, ignore_errors=True)
    dir = root / md.hash
    dir.mkdir(parents=True)
    (dir / "metadata.json").write_bytes(orjson.dumps(dataclasses.asdict(md), option=orjson.OPT_INDENT_2))
    eps = max_tokens // (T * len(layers))
    shards = []
    for s in range(0, n, eps):
        name = f"acts{s // eps:06}.bin"
        mm = np.memmap(dir / name, mode="w+", dtype=np.float32, shape=(eps, len(layers), T, d))
        k = min(eps, n - s)
        mm[:k] = acts[s:s + k]
        mm.flush()
        del mm
        shards.append({"name": name, "n_examples": k})
    (dir / "shards.json").write_bytes(orjson.dumps(shards, option=orjson.OPT_INDENT_2))
    lab = np.memmap(dir / "labels.bin", mode="w+", dtype=np.uint8, shape=(n, content))
    lab[:] = labels
    lab.flush()
    print("2.1 store:", dir)


def write_paper(name="paper", prefix="vit"):
    md = {f"{prefix}_family": "clip", f"{prefix}_ckpt": "ViT-B-16/openai"}
    md.update(layers=list(layers), n_patches_per_img=content,
              cls_token=True, d_vit=d, seed=42, n_imgs=n, n_patches_per_shard=max_tokens, data="fixture")
    root = OUT / name
    shutil.rmtree(root, ignore_errors=True)
    dir = root / hashlib.sha256(json.dumps(md, sort_keys=True).encode("utf-8")).hexdigest()
    dir.mkdir(parents=True)
    with open(dir / "metadata.json", "w") as fd:
        json.dump(md, fd, indent=4)
    per_shard = max_tokens // len(layers) // (content + 1)
    for s in range(0, n, per_shard):
        mm = np.memmap(dir / f"acts{s // per_shard:06}.bin", mode="w+", dtype=np.float32, shape=(per_shard, len(layers), T, d))
        k = min(per_shard, n - s)
        mm[:k] = acts[s:s + k]
        mm.flush()
        del mm
    print(f"{name} store:", dir)


OUT.mkdir(parents=True, exist_ok=True)
save_file({"acts": acts, "labels": labels}, OUT / "raw.safetensors")
write_21()
write_paper()
write_paper("feb2025", "model")
