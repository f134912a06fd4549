"""Placement detection from block structure (probe/structure.py): our placements, hand-made tensors and
a user's DyT. Transformers families and the reasons for `other`: tests/test_structure_hf.py."""

from __future__ import annotations

import pytest
import torch

from residual_probe.models import PLACEMENTS, ModelConfig, build_model
from residual_probe.probe import find_blocks
from residual_probe.probe.structure import classify, detect_placement

OURS = {
    "post-ln": "post-ln",
    "deepnorm": "post-ln",
    "b2t": "post-ln",
    "pre-ln": "pre-ln",
    "sandwich": "sandwich",
    "peri-ln": "peri-ln",
    "lns": "pre-ln",
    "residual": "residual",
    "mix-ln": "mix-ln",
    "rezero": "no-norm",
    "dyt": "dyt",
    "dyt-llama": "dyt",  # no bias, alpha per position: the same squashing norm
    # no pre-norm on attention, q, k, v normed inside it (attention internals, QK-norm), the
    # FFN's norm on the sum and its residual from the normed value
    "hybridnorm": "hybridnorm",
    # HybridNorm* : a Pre-LN first block (q, k, v normed too), HybridNorm blocks after it
    "hybridnorm-star": "hybridnorm-star",
    "deepscale": "pre-ln",  # x <- lambda x + beta F(LN(x)): a norm reads x, the branch joins as is
    # n residual copies (h0..h3) mixed by the matrices the hyper-connections return: HC's learned
    # ones (here trained-looking) are not doubly stochastic, mHC's Sinkhorn-projected ones are
    "hc": "hyper-connections (n=4)",
    "mhc": "mhc",
    # nGPT's l2 normalizations are functions, not modules: no stream norm, the stream on the sphere
    "ngpt": "ngpt",
    "tfixup": "no-norm",
    "admin": "post-ln",  # LN(x * omega + F(x))
}


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_our_placements(placement, norm):
    assert set(OURS) == set(PLACEMENTS)
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            arch="seq2seq",
            placement=placement,
            depth=4,
            d_model=16,
            heads=4,
            ffn=24,
            max_len=64,
            mix_ratio=0.5,
            norm="layernorm" if PLACEMENTS[placement].norm else norm,
        )
    ).eval()
    with torch.no_grad():  # trained-looking norm weights, ReZero gates and mixings
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("gate") or "_hc." in name:
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(1, 256, (1, 8))
    found = detect_placement(find_blocks(model), lambda: model(ids, ids), model)
    assert found["placement"] == OURS[placement], found["detail"]
    expected = (
        "none" if OURS[placement] in ("no-norm", "ngpt") else PLACEMENTS[placement].norm or norm
    )
    expected = "dyt" if expected == "dyt-nobias" else expected  # a DyT with or without beta
    assert found["norm_type"] == expected
    if placement == "mix-ln":
        assert found["per_block"]["encoder"] == ["post-ln", "post-ln", "pre-ln", "pre-ln"]


def test_classify_on_hand_made_tensors():
    x, f = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ln = torch.nn.functional.layer_norm
    n = lambda t: ln(t, (8,))  # noqa: E731
    kind = lambda *a: classify(*a)[0]  # noqa: E731
    assert kind((x,), (n(x + f),), [(x + f, n(x + f))]) == "post-ln"
    assert kind((x,), (x + f,), [(x, n(x))]) == "pre-ln"
    assert kind((x,), (x + n(f),), [(x, n(x)), (f, n(f))]) == "sandwich"
    assert kind((x,), (x + n(f),), [(f, n(f))]) == "res-post-ln"
    assert kind((x,), (x + f,), []) == "no-norm"
    unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    assert kind((unit(x),), (unit(x + f),), []) == "ngpt"
    assert kind((x,), (x + f,), [(f, n(f))]) == "other"


class Squash(torch.nn.Module):
    """A user's own DyT under a name the detector has never seen (the paper's is DynamicTanh)."""

    def __init__(self, d):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.full((1,), 0.5))
        self.gamma = torch.nn.Parameter(1 + 0.3 * torch.randn(d))
        self.beta = torch.nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return self.gamma * torch.tanh(self.alpha * x) + self.beta


def test_dyt_is_recognised_by_behaviour_in_a_users_model():
    """nn.TransformerEncoder, Pre-LN (norm_first), every LayerNorm swapped for a DyT of any name:
    read as dyt with norm type dyt (was no-norm, norm type none); a LayerScale-like per-channel
    scale is not a norm."""
    from residual_probe.probe.discovery import is_norm, squashes

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=True)
    model = torch.nn.TransformerEncoder(layer, 3, norm=torch.nn.LayerNorm(16))
    for blk in model.layers:
        blk.norm1, blk.norm2 = Squash(16), Squash(16)
    model.norm = Squash(16)
    model.eval()
    x = torch.randn(5, 2, 16)
    found = detect_placement(find_blocks(model), lambda: model(x), model)
    assert (found["placement"], found["norm_type"]) == ("dyt", "dyt"), found["detail"]
    assert squashes(model.norm) and is_norm(model.norm)

    class LayerScale(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.gamma, self.alpha = (
                torch.nn.Parameter(torch.ones(d)),
                torch.nn.Parameter(torch.ones(1)),
            )

        def forward(self, x):
            return self.alpha * self.gamma * x

    assert not squashes(LayerScale(16)) and not squashes(torch.nn.Linear(16, 16))
