#!/usr/bin/env python3
"""HF transformers Dinov2Model on a saev model directory: images/s at 224, all hidden states,
torch at its best on this machine — float32 with flush-to-zero set (denormals are slow on
Intel cores), and bfloat16 weights and activations (oneDNN's AMX / AVX-512-BF16 kernels).

Called by `cargo bench -p saev --bench backbone` when SAEV_BENCH_TORCH_PYTHON is set, with
`--serve`: after a `ready` line it reads `f32` or `bf16` lines on stdin and answers each with the
seconds of one batch, so the bench can alternate saev's and torch's batches (paired rounds:
a noisy machine slows both sides of a pair alike). Without `--serve` it prints medians.
"""
import argparse
import copy
import sys
import time

import torch
import transformers

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--iters", type=int, default=8)
ap.add_argument("--serve", action="store_true")
args = ap.parse_args()
torch.set_flush_denormal(True)
model = transformers.Dinov2Model.from_pretrained(args.model_dir).eval()
x = torch.randn(args.batch, 3, 224, 224)

if args.serve:
    pairs = {"f32": (model, x), "bf16": (copy.deepcopy(model).to(torch.bfloat16), x.to(torch.bfloat16))}
    print(f"torch {torch.__version__} transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"flush-to-zero on", flush=True)
    print("ready", flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            m, xx = pairs[line.strip()]
            t0 = time.perf_counter()
            m(pixel_values=xx, output_hidden_states=True)
            print(f"{time.perf_counter() - t0:.6f}", flush=True)
    sys.exit(0)


def run(m, x):
    times = []
    with torch.inference_mode():
        for i in range(args.iters + 2):
            t0 = time.perf_counter()
            m(pixel_values=x, output_hidden_states=True)
            dt = time.perf_counter() - t0
            if i >= 2:
                times.append(dt)
    times.sort()
    return args.batch / times[len(times) // 2]


f32 = run(model, x)
bf16 = run(model.to(torch.bfloat16), x.to(torch.bfloat16))
print(f"torch {torch.__version__} transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
      f"flush-to-zero on: float32 {f32:.1f} images/s, bfloat16 {bf16:.1f} images/s (median of {args.iters})")
print(f"torch_images_per_s={f32:.3f}")
print(f"torch_bf16_images_per_s={bf16:.3f}")
