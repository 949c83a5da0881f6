"""Which rounding model torch's bfloat16 CPU attention follows (the reference for saev's bf16
attention, `saev/src/backbone/amx_attention.rs`).

Two models of `softmax(q kᵀ / √hd) v` in bf16, both from the same bf16 q, k, v in float64:
- normalised: p = exp(s − max) / Σ exp, rounded to bf16, then p·v;
- flash: e = exp(s − max) rounded to bf16, e·v, divided by Σ exp (torch's CPU flash kernel).
Prints, per shape, the share of torch's outputs each model reproduces bit for bit
(torch 2.15 on an Intel AMX Xeon: flash 95% / 86%, normalised 54% / 50%).

Run: python scripts/check_torch_sdpa_rounding.py   (needs torch)
"""

import torch
import torch.nn.functional as F


def main() -> None:
    torch.manual_seed(0)
    r = lambda x: x.float().bfloat16().double()  # noqa: E731
    for t, hd in [(37, 40), (257, 64)]:
        q, k, v = (torch.randn(1, 2, t, hd).bfloat16() for _ in range(3))
        out = F.scaled_dot_product_attention(q, k, v).double()
        s = (q.double() @ k.double().transpose(-1, -2)) * hd**-0.5
        e = (s - s.amax(-1, keepdim=True)).exp()
        z = e.sum(-1, keepdim=True)
        normalised = r(r(e / z) @ v.double())
        flash = r((r(e) @ v.double()) / z)
        share = lambda m: (out == m).double().mean().item()  # noqa: E731
        print(
            f"T {t}, hd {hd}: flash model {share(flash):.1%} of outputs exact, "
            f"normalised {share(normalised):.1%}"
        )


if __name__ == "__main__":
    main()
