"""Liu et al. 2020 ("Understanding the Difficulty of Training Transformers", Sec. 4): output change.

How far a model's output moves when every weight moves by a small random perturbation,
E||F(x, W) - F(x, W + delta)||^2, is their "amplification" measure: it grows O(N) with depth
for Post-LN and O(log N) for Pre-LN, which is why Post-LN needs warm-up. Needs a model, so it
lives apart from the pure tensor metrics.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def output_change(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], epsilon: float = 1e-3, seed: int = 0
) -> torch.Tensor:
    """Mean over output elements of (F(x, W) - F(x, W + delta))^2, a 0-d float64 tensor.

    delta_p = epsilon * rms(p) * N(0, 1) for each floating-point parameter p (a relative
    perturbation, so every tensor moves by the same fraction of its size; a zero tensor,
    e.g. ReZero's gate, stays put). The model is restored exactly afterwards, and evaluated
    in eval mode (no dropout) so only the perturbation moves the output.
    """
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.is_floating_point()]
    saved = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    try:
        ref = model(*inputs).double()
        for p in params:
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device)
            p.add_((epsilon * p.double().square().mean().sqrt() * noise).to(p.dtype))
        moved = model(*inputs).double()
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
        model.train(was_training)
    return (moved - ref).square().mean()
