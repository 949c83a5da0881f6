"""Time the Python saev 0.1.0 ReLU training step and a dense-decoder TopK step in torch (CPU),
at the same sizes and sparsity as `cargo bench -p saev --bench sae_step`, for side-by-side ratios.

Usage: python bench_torch_sae.py --d 384 --d-sae 6144 --batch 4096 --iters 5 [--relu-l0 61]
Prints lines `torch <name>: <patches/s> patches/s` that the Rust bench parses.

The ReLU step is saev 0.1.0's loop body (normalize_w_dec, forward, backward,
remove_parallel_grads, fused Adam). `b_enc` is shifted so that about `--relu-l0` latents fire per
row, as in a trained SAE; torch's cost does not depend on it (dense), ours does.
The TopK step is what HEAD saev / SAELens do: dense pre-activations, torch.topk, scatter into a
dense code, dense decoder, MSE, Adam. The AuxK step adds the auxiliary loss of Gao et al. (2024)
as SAELens / sparsify write it in torch: the residual `x - x_hat` predicted from the top
`--aux-k` pre-activations of the dead latents (every 6th latent, 1,024 of 6,144, as in the Rust
bench), normalised by the residual's variance, coefficient 1/32. The BatchTopK step keeps the
top `k · batch` ReLU'd pre-activations of the whole batch (Bussmann et al., 2024).
"""

import argparse
import time

import torch

import saev.config
import saev.nn

p = argparse.ArgumentParser()
p.add_argument("--d", type=int, default=384)
p.add_argument("--d-sae", type=int, default=6144)
p.add_argument("--batch", type=int, default=4096)
p.add_argument("--iters", type=int, default=5)
p.add_argument("--k", type=int, default=32)
p.add_argument("--relu-l0", type=float, default=61.0)
p.add_argument("--aux-k", type=int, default=192)
a = p.parse_args()
torch.manual_seed(0)
x = torch.randn(a.batch, a.d)


def timed(step, name):
    for _ in range(2):
        step()
    ts = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    print(f"torch {name}: {a.batch / ts[len(ts) // 2]:.0f} patches/s", flush=True)


sae = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=a.d, exp_factor=a.d_sae // a.d, sparsity_coeff=4e-4))
with torch.no_grad():
    pre = (x - sae.b_dec) @ sae.W_enc
    q = 1.0 - a.relu_l0 / a.d_sae
    sae.b_enc.copy_(-torch.quantile(pre.flatten()[:1_000_000], q))
opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)


def relu_step():
    sae.normalize_w_dec()
    _, _, loss = sae(x)
    loss.loss.backward()
    sae.remove_parallel_grads()
    opt.step()
    opt.zero_grad()


with torch.no_grad():
    _, f, _ = sae(x)
    print(f"torch relu L0: {(f > 0).float().sum(1).mean().item():.1f}", flush=True)
timed(relu_step, "saev-0.1.0 relu step")

W_enc = torch.nn.Parameter(torch.randn(a.d, a.d_sae) / a.d**0.5)
b_enc = torch.nn.Parameter(torch.zeros(a.d_sae))
W_dec = torch.nn.Parameter(torch.randn(a.d_sae, a.d) / a.d**0.5)
b_dec = torch.nn.Parameter(torch.zeros(a.d))
opt2 = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4, fused=True)


def topk_step():
    pre = (x - b_dec) @ W_enc + b_enc
    v, i = torch.topk(pre, a.k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    x_hat = f @ W_dec + b_dec
    loss = (x_hat - x).pow(2).mean()
    loss.backward()
    opt2.step()
    opt2.zero_grad()


timed(topk_step, f"dense topk k={a.k} step")


dead = torch.arange(a.d_sae) % 6 == 0


def auxk_step():
    pre = (x - b_dec) @ W_enc + b_enc
    v, i = torch.topk(pre, a.k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    x_hat = f @ W_dec + b_dec
    e = x - x_hat
    mse = e.pow(2).mean()
    av, ai = torch.topk(pre.masked_fill(~dead, float("-inf")), a.aux_k, dim=-1)
    fa = torch.zeros_like(pre).scatter(-1, ai, torch.relu(av))
    e_hat = fa @ W_dec
    e = e.detach()
    aux = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    (mse + aux / 32).backward()
    opt2.step()
    opt2.zero_grad()


timed(auxk_step, f"dense topk k={a.k} + auxk {a.aux_k} step")


def batch_topk_step():
    pre = torch.relu((x - b_dec) @ W_enc + b_enc)
    flat = pre.flatten()
    v, i = torch.topk(flat, a.k * a.batch)
    f = torch.zeros_like(flat).scatter(-1, i, v).view_as(pre)
    x_hat = f @ W_dec + b_dec
    loss = (x_hat - x).pow(2).mean()
    loss.backward()
    opt2.step()
    opt2.zero_grad()


timed(batch_topk_step, f"dense batchtopk k={a.k} step")
