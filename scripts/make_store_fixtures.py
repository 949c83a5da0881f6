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
  v100/<sha256>/         protocol "1.0.0" (writers.py, 19 June to 30 September 2025): the paper
                         era's names with `max_patches_per_shard`, `dtype` and `protocol`, plus
                         shards.json; directory = sha256 of json.dumps(sort_keys, compact)
  v11/<sha256>/          protocol "1.1" (30 September to 8 October 2025): as 1.0.0 with `data`
                         a JSON object and `pixel_agg`; here without a CLS token and with
                         labels.bin (a segmentation store)
  py20/<hash8>/          protocol "2.0" (8 to 13 October 2025): 2.1's names, `data` a JSON object,
                         `pixel_agg` null (a classification store)
  py21null/<hash8>/      protocol 2.1 as written on 13 and 14 October 2025 (before commit
                         075ac76): `pixel_agg` null for a classification store
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


def write_shards(dir, a, n_tokens, shards_json=True):
    eps = max_tokens // (n_tokens * len(layers))
    shards = []
    for s in range(0, n, eps):
        name = f"acts{s // eps:06}.bin"
        mm = np.memmap(dir / name, mode="w+", dtype=np.float32, shape=(eps, len(layers), n_tokens, d))
        k = min(eps, n - s)
        mm[:k] = a[s:s + k]
        mm.flush()
        del mm
        shards.append({"name": name, "n_examples": k})
    return shards


def write_21():
    md = Metadata("dinov2", "facebook/dinov2-small", layers, content, cls, d, n, max_tokens, "fixture", "/data/fixture")
    root = OUT / "py21"
    shutil.rmtree(root, ignore_errors=True)
    dir = root / md.hash
    dir.mkdir(parents=True)
    (dir / "metadata.json").write_bytes(orjson.dumps(dataclasses.asdict(md), option=orjson.OPT_INDENT_2))
    shards = write_shards(dir, acts, T)
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


def write_v1(name, protocol, with_cls):
    """writers.py of June to October 2025: Metadata dumped with json.dump(indent=4),
    shards.json with json.dump(indent=2)."""
    md = dict(vit_family="dinov2", vit_ckpt="facebook/dinov2-small", layers=list(layers),
              n_patches_per_img=content, cls_token=with_cls, d_vit=d, n_imgs=n,
              max_patches_per_shard=max_tokens)
    if protocol == "1.0.0":
        md.update(data="fixture", dtype="float32", protocol=protocol)
    else:
        md.update(data={"__class__": "SegFolder", "root": "/data/fixture"}, pixel_agg="majority",
                  dtype="float32", protocol=protocol)
    root = OUT / name
    shutil.rmtree(root, ignore_errors=True)
    dir = root / hashlib.sha256(json.dumps(md, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
    dir.mkdir(parents=True)
    with open(dir / "metadata.json", "w") as fd:
        json.dump(md, fd, indent=4)
    a = acts if with_cls else acts[:, :, 1:, :]
    shards = write_shards(dir, a, content + int(with_cls))
    with open(dir / "shards.json", "w") as fd:
        json.dump(shards, fd, indent=2)
    if protocol == "1.1":
        lab = np.memmap(dir / "labels.bin", mode="w+", dtype=np.uint8, shape=(n, content))
        lab[:] = labels
        lab.flush()
    print(f"{protocol} store:", dir)


def write_2x(name, protocol):
    """shards.py of 8 to 14 October 2025: orjson, pixel_agg null for classification data."""
    md = dict(family="dinov2", ckpt="facebook/dinov2-small", layers=list(layers),
              content_tokens_per_example=content, cls_token=cls, d_model=d, n_examples=n,
              max_tokens_per_shard=max_tokens,
              data={"__class__": "ImageFolder", "root": "/data/fixture"} if protocol == "2.0" else "fixture",
              dataset="/data/fixture", pixel_agg=None, dtype="float32", protocol=protocol)
    root = OUT / name
    shutil.rmtree(root, ignore_errors=True)
    dir = root / hashlib.sha256(orjson.dumps(md, option=orjson.OPT_SORT_KEYS)).hexdigest()[:8]
    dir.mkdir(parents=True)
    (dir / "metadata.json").write_bytes(orjson.dumps(md, option=orjson.OPT_INDENT_2))
    shards = write_shards(dir, acts, T)
    (dir / "shards.json").write_bytes(orjson.dumps(shards, option=orjson.OPT_INDENT_2))
    print(f"{protocol} store (pixel_agg null):", dir)


OUT.mkdir(parents=True, exist_ok=True)
save_file({"acts": acts, "labels": labels}, OUT / "raw.safetensors")
write_21()
write_paper()
write_paper("feb2025", "model")
write_v1("v100", "1.0.0", True)
write_v1("v11", "1.1", False)
write_2x("py20", "2.0")
write_2x("py21null", "2.1")
