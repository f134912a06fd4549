"""Liu et al.'s output change: a linear model's closed form, restoring the weights, depth growth."""

import pytest
import torch
from torch import nn

from residual_probe.analysis.amplification import output_change
from residual_probe.models import ModelConfig, Transformer


def test_linear_model_closed_form_and_restored_weights():
    # y = W x, delta = eps * rms(W) * N(0,1): E[(delta x)_i^2] = eps^2 rms(W)^2 ||x||^2 per output
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(16, 64)
    before = lin.weight.detach().clone()
    eps = 1e-2
    mc = torch.stack([output_change(lin, (x,), eps, seed=s) for s in range(200)]).mean()
    expected = eps**2 * lin.weight.double().square().mean() * x.double().square().sum(-1).mean()
    assert mc.item() == pytest.approx(
        expected.item(), rel=0.05
    )  # 200 x 512 chi-square terms: ~1 % sd
    assert torch.equal(lin.weight, before)


def test_postln_output_change_grows_faster_with_depth_than_preln():
    # Liu et al. 2020, Fig. 5 / Theorem 2: O(N) for Post-LN, O(log N) for Pre-LN (here at init)
    tokens = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    growth = {}
    for p in ("post-ln", "pre-ln"):
        change = []
        for depth in (2, 16):
            torch.manual_seed(0)
            model = Transformer(
                ModelConfig(arch="encoder", placement=p, depth=depth, d_model=32, heads=2, ffn=64)
            )
            change.append(
                torch.stack(
                    [output_change(model, (tokens,), 1e-2, seed=s) for s in range(4)]
                ).mean()
            )
        growth[p] = (change[1] / change[0]).item()
    assert growth["post-ln"] > 2 * growth["pre-ln"], growth
