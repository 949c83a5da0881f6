#!/usr/bin/env python3
"""torch.save files for saev's torch-zip reader (saev/src/util/torch_load.rs).

Writes tests/fixtures/torch/:
  mixed_dtypes.bin   a state dict as older checkpoints hold it: float weights (float32, float16,
                     bfloat16, float64, a transposed view) next to integer and bool buffers
                     (`embeddings.position_ids` int64 as transformers < 4.31 saved in CLIP's
                     pytorch_model.bin, BatchNorm's `num_batches_tracked`, a bool mask)
  mixed_dtypes.json  the float tensors' shapes and values as torch sees them (float32), for the
                     test to compare against
Needs torch. CI never runs this; the outputs are committed.
"""
import json
import pathlib

import torch

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "torch"
OUT.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(0)
w = torch.randn(3, 4, generator=g)
sd = {
    "embeddings.position_ids": torch.arange(5).unsqueeze(0),
    "proj.weight": w,
    "proj.weight_t": w.t(),
    "half.weight": torch.randn(2, 3, generator=g).half(),
    "bf16.weight": torch.randn(4, generator=g).bfloat16(),
    "double.bias": torch.randn(3, generator=g, dtype=torch.float64),
    "bn.num_batches_tracked": torch.tensor(7),
    "mask": torch.tensor([True, False, True]),
}
torch.save(sd, OUT / "mixed_dtypes.bin")
want = {
    k: {"shape": list(v.shape), "values": v.float().flatten().tolist()}
    for k, v in sd.items()
    if v.is_floating_point()
}
(OUT / "mixed_dtypes.json").write_text(json.dumps(want, indent=1) + "\n")
print(OUT, sorted(want))
