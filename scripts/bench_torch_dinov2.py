#!/usr/bin/env python3
"""HF transformers Dinov2Model on a saev model directory: images/s at 224, all hidden states.

Called by `cargo bench -p saev --bench backbone` when SAEV_BENCH_TORCH_PYTHON is set.
"""
import argparse
import time

import torch
import transformers

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--iters", type=int, default=8)
args = ap.parse_args()
model = transformers.Dinov2Model.from_pretrained(args.model_dir).eval()
x = torch.randn(args.batch, 3, 224, 224)
times = []
with torch.inference_mode():
    for i in range(args.iters + 2):
        t0 = time.perf_counter()
        out = model(pixel_values=x, output_hidden_states=True)
        dt = time.perf_counter() - t0
        if i >= 2:
            times.append(dt)
times.sort()
med = times[len(times) // 2]
print(f"torch {torch.__version__} transformers {transformers.__version__}, {torch.get_num_threads()} threads: "
      f"{args.batch / med:.1f} images/s (median of {args.iters})")
print(f"torch_images_per_s={args.batch / med:.3f}")
