#!/usr/bin/env python3
"""A Python saev (HEAD) TopK checkpoint for notebook 04-released-saes and its tests.

Writes tests/fixtures/notebook/:
  topk-d32.pt              written by the Python saev's own `dump` at HEAD (schema 5): d_model 32
                           (the width of tests/fixtures/backbone/tiny-dinov2-reg, a
                           Dinov2WithRegistersModel), d_sae 128, TopK k = 8, the Python saev's own
                           initialisation (encoder = decoder transpose), torch seed 0
  topk-d32.reference.safetensors
                           `x` [16, 32] and the Python saev's own forward after `load`: `f_x`, `x_hat`

The Python saev is not on PyPI at HEAD: pass a source tree (`git archive` of
OSU-NLP-Group/saev, e.g. commit 3d73f1f, `src/` directory) and a directory with its pure-Python
dependencies (beartype, einops, jaxtyping, tyro). Needs torch, safetensors. CI never runs this.

    python scripts/make_notebook_sae.py --saev-src /tmp/saev-head/src --pythonpath /tmp/saev-pydeps
"""
import argparse
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "notebook"

ap = argparse.ArgumentParser()
ap.add_argument("--saev-src", required=True)
ap.add_argument("--pythonpath", default="")
args = ap.parse_args()
sys.path[:0] = [args.saev_src] + [p for p in args.pythonpath.split(":") if p]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from saev.nn import modeling  # noqa: E402

OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
cfg = modeling.SparseAutoencoderConfig(d_model=32, d_sae=128, activation=modeling.TopK(top_k=8))
sae = modeling.SparseAutoencoder(cfg)
path = OUT / "topk-d32.pt"
if hasattr(modeling, "helpers"):  # the header's "commit": the HEAD this was made with
    modeling.helpers.current_git_commit = lambda: "3d73f1f"
modeling.dump(path, sae)
loaded = modeling.load(path)
loaded.eval()
x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * 3.0
with torch.no_grad():
    out = loaded(x)
f_x, x_hat = out.f_x, out.x_hats
if x_hat.ndim == 3:
    x_hat = x_hat[:, -1, :]
save_file({"x": x.contiguous(), "f_x": f_x.contiguous(), "x_hat": x_hat.contiguous()},
          OUT / "topk-d32.reference.safetensors")
print(path, path.stat().st_size, "bytes;", path.read_text(errors="replace").splitlines()[0])
