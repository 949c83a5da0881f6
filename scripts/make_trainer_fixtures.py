#!/usr/bin/env python3
"""Training-parity fixture from the real Python saev 0.1.0 (the paper's code).

Runs saev 0.1.0's own `nn.SparseAutoencoder` through the exact step of its `training.train`
(the loop body and `make_saes`/`Warmup` reproduced here, since `saev.training` imports wandb)
loop (normalize_w_dec → forward → loss.backward → remove_parallel_grads → fused Adam step →
Warmup lr update; its sparsity warm-up is a no-op there, a known bug) for two sweep settings on
the same batches, and saves tests/fixtures/trainer/saev010-relu.safetensors:
  batches                [n_steps, B, d] inputs
  s{k}.init.{W_enc,b_enc,W_dec,b_dec}    initial weights (Kaiming init, torch seed)
  s{k}.step{t}.{mse,sparsity,loss,l0,l1} loss terms at step t (before the update)
  s{k}.final.{...}       weights after n_steps updates
and its settings in the metadata. Needs: pip install --no-deps saev==0.1.0; beartype jaxtyping
einops torch safetensors. CI never runs this.
"""
import json
import pathlib

import torch
from safetensors.torch import save_file

import saev.config
import saev.nn

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "trainer"
OUT.mkdir(parents=True, exist_ok=True)

d, exp, B, n_steps, n_warmup = 16, 4, 64, 6, 3
settings = [dict(lr=1e-3, sparsity_coeff=4e-4), dict(lr=3e-3, sparsity_coeff=1.6e-2)]
torch.manual_seed(0)
# saev.training.make_saes, inline (importing saev.training needs wandb): one param group per
# SAE, initial lr 0.0 ("our first step is warmup").
saes = [saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=d, exp_factor=exp, sparsity_coeff=s["sparsity_coeff"])) for s in settings]
groups = [{"params": sae.parameters(), "lr": 0.0} for sae in saes]


class Warmup:
    """saev.training.Warmup, verbatim logic."""

    def __init__(self, init, final, n_steps):
        self.init, self.final, self.n_steps, self._step = init, final, n_steps, 0

    def step(self):
        self._step += 1
        if self._step < self.n_steps:
            return self.init + (self.final - self.init) * (self._step / self.n_steps)
        return self.final


g = torch.Generator().manual_seed(1)
batches = torch.randn(n_steps, B, d, generator=g) * 3.0 + torch.linspace(-1, 1, d)
out = {"batches": batches.clone()}
for k, sae in enumerate(saes):
    for name, p in sae.state_dict().items():
        out[f"s{k}.init.{name}"] = p.clone()

optimizer = torch.optim.Adam(groups, fused=True)
lr_schedulers = [Warmup(0.0, s["lr"], n_warmup) for s in settings]
for t in range(n_steps):
    acts_BD = batches[t]
    for sae in saes:
        sae.normalize_w_dec()
    _, _, losses = zip(*(sae(acts_BD) for sae in saes))
    for k, loss in enumerate(losses):
        for term in ["mse", "sparsity", "loss", "l0", "l1"]:
            out[f"s{k}.step{t}.{term}"] = getattr(loss, term).detach().reshape(1).clone()
    for loss in losses:
        loss.loss.backward()
    for sae in saes:
        sae.remove_parallel_grads()
    optimizer.step()
    for group, sched in zip(optimizer.param_groups, lr_schedulers):
        group["lr"] = sched.step()
    optimizer.zero_grad()
for k, sae in enumerate(saes):
    for name, p in sae.state_dict().items():
        out[f"s{k}.final.{name}"] = p.detach().clone()
meta = {"d": str(d), "d_sae": str(d * exp), "batch": str(B), "n_steps": str(n_steps),
        "n_lr_warmup": str(n_warmup), "settings": json.dumps(settings), "torch": torch.__version__,
        "adam": "torch.optim.Adam(fused=True), betas (0.9, 0.999), eps 1e-8, initial lr 0"}
save_file({k: v.contiguous().float() for k, v in out.items()}, OUT / "saev010-relu.safetensors", metadata=meta)
print({k: float(v) for k, v in out.items() if k.endswith("loss")})
