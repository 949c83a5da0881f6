#!/usr/bin/env python3
"""Python saev SAE checkpoints (`sae.pt`) for saev's importer tests, written by torch.

Writes tests/fixtures/sae/:
  paper.pt      saev 0.1.0 `nn.dump` layout: one JSON line (vars(cfg)) + torch.save(state_dict)
  schema5.pt    HEAD layout: one JSON line {"schema": 5, "cfg": {..., "activation": {...}}} + torch.save
  expected.safetensors  the same tensors (W_enc, b_enc, W_dec, b_dec) for comparison
Tensors are random with a fixed seed; W_dec is stored transposed-then-made-contiguous in one file
and as a non-contiguous view in the other, to exercise strides and storage offsets.
Needs torch, safetensors. CI never runs this.
"""
import json
import pathlib

import torch
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sae"
OUT.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(0)
d, d_sae = 8, 32
sd = {
    "W_enc": torch.randn(d, d_sae, generator=g),
    "b_enc": torch.randn(d_sae, generator=g),
    "W_dec": torch.randn(d_sae, d, generator=g),
    "b_dec": torch.randn(d, generator=g),
}
save_file({k: v.contiguous() for k, v in sd.items()}, OUT / "expected.safetensors")



class Sae(torch.nn.Module):
    """Holds the tensors as Parameters so state_dict() is a real OrderedDict with _metadata."""

    def __init__(self, tensors):
        super().__init__()
        for k, v in tensors.items():
            setattr(self, k, torch.nn.Parameter(v))


paper_cfg = {"d_vit": d, "exp_factor": 4, "sparsity_coeff": 0.0004, "n_reinit_samples": 524288,
             "ghost_grads": False, "remove_parallel_grads": True, "normalize_w_dec": True, "seed": 0}
with open(OUT / "paper.pt", "wb") as fd:
    fd.write((json.dumps(paper_cfg) + "\n").encode("utf-8"))
    torch.save(Sae(sd).state_dict(), fd)

# HEAD: W_dec saved as a transposed view of a [d, d_sae] buffer (non-contiguous strides), b_enc
# as a slice with a storage offset.
big = torch.cat([torch.zeros(3), sd["b_enc"]])
sd5 = {"W_enc": sd["W_enc"], "b_enc": big[3:], "W_dec": sd["W_dec"].t().contiguous().t(), "b_dec": sd["b_dec"]}
# The schema-5 header as the Python saev's `dump` writes it (an earlier version of this script
# invented `"activation": {"key": "relu"}`, which the Python loader rejects).
relu = {"cls": "Relu", "params": {"key": "relu",
        "sparsity": {"cls": "L1Sparsity", "params": {"key": "l1-sparsity", "coeff": 0.0004}},
        "aux": {"cls": "NoAux", "params": {"key": "no-aux"}}}}
header = {"schema": 5, "cfg": {"d_model": d, "d_sae": d_sae, "activation": relu, "reinit_blend": 0.8,
          "reinit_enc_dec_tranpose": True, "remove_parallel_grads": True, "normalize_w_dec": True},
          "commit": "unknown", "lib": "0.1.0"}
with open(OUT / "schema5.pt", "wb") as fd:
    fd.write((json.dumps(header) + "\n").encode("utf-8"))
    torch.save(Sae(sd5).state_dict(), fd)
print(sorted(p.name for p in OUT.iterdir()))
