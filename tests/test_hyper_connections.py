"""Hyper-connection models: n residual copies recorded as streams h0..h{n-1}, and the mixing's
distance from doubly stochastic and its gain over depth (`hc_mixing`), each against a direct
computation; on the `hc` / `mhc` reference placements and on transformers' DeepSeek-V4."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import tiny_hf_config

from residual_probe.models import build_model
from residual_probe.models.placements import hyper_connections
from residual_probe.probe import Probe

SMALL = dict(arch="decoder", depth=3, d_model=16, heads=2, ffn=32, vocab_size=50, max_len=32)


def trained_looking(placement, **kw):
    """A float64 model whose mixings are far from their init (HC's can then amplify)."""
    torch.manual_seed(0)
    model = build_model(placement=placement, **{**SMALL, **kw}).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_hc." in name:
                p.add_(0.4 * torch.randn_like(p))
    return model


def keeper(outs):
    """A forward hook keeping each output, its gradient retained (returns None: output unchanged)."""

    def hook(module, args, out):
        out.retain_grad()
        outs.append(out)

    return hook


def run(model, probe_quantities=None):
    """One recorded step; block outputs and every mixer's comb kept for the direct computation."""
    probe = Probe(model, quantities=probe_quantities or ("act_grad_norm", "hc_mixing")).attach()
    outs, combs = [], []
    hooks = [b.register_forward_hook(keeper(outs)) for b in model.decoder.layers]
    for b in model.decoder.layers:
        for hc in hyper_connections(b):
            hooks.append(hc.register_forward_hook(lambda m, a, o: combs.append(o[1].detach())))
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    rows = pd.DataFrame(probe.step())
    for h in hooks:
        h.remove()
    probe.detach()
    return rows, outs, combs


@pytest.mark.parametrize("placement,dynamic", [("hc", True), ("hc", False), ("mhc", True)])
def test_each_copy_gradient_equals_autograd(placement, dynamic):
    model = trained_looking(placement, hc_dynamic=dynamic)
    rows, outs, _ = run(model, ("act_grad_norm", "forward_stats", "hc_mixing"))
    cos = rows[rows.metric == "cos_adjacent"]
    for k in (1, 2):  # each copy's own transition, h_i of block k-1 to h_i of block k
        for i in range(4):
            a, b = outs[k - 1][..., i, :], outs[k][..., i, :]
            want = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
            value = cos[(cos.layer == k) & (cos.stream == f"h{i}")].value.item()
            assert value == pytest.approx(want, rel=1e-6)
    got = rows[(rows.metric == "act_grad_norm") & (rows.sublayer == "block")]
    assert sorted(got.stream.unique()) == ["h0", "h1", "h2", "h3"]
    for k, out in enumerate(outs):
        for i in range(4):
            g = out.grad[..., i, :]
            want = float(g.pow(2).sum(-1).mean().sqrt())  # RMS over tokens of ||dL/dh||
            value = got[(got.layer == k) & (got.stream == f"h{i}")].value.item()
            assert value == pytest.approx(want, rel=1e-9)


def test_mixing_error_and_gain_equal_a_direct_computation():
    model = trained_looking("hc")
    rows, _, combs = run(model)
    mix = rows[rows.metric.str.startswith("hc_")]
    assert len(combs) == 6 and set(mix.sublayer) == {"attn_hc", "ffn_hc"}
    product = torch.eye(4, dtype=torch.float64)
    for j, comb in enumerate(combs):
        m = comb.reshape(-1, 4, 4)
        error = torch.stack(
            [
                (m.sum(-1) - 1).abs().amax(-1),
                (m.sum(-2) - 1).abs().amax(-1),
                (-m).clamp(min=0).flatten(1).amax(-1),
            ]
        ).amax(0)
        product = m.transpose(-1, -2) @ product  # h' = comb^T h
        want = {
            "hc_ds_error": float(error.mean()),
            "hc_gain_fwd": float(product.abs().sum(-1).amax(-1).max()),
            "hc_gain_bwd": float(product.abs().sum(-2).amax(-1).max()),
        }
        layer, name = divmod(j, 2)
        at = mix[(mix.layer == layer) & (mix.sublayer == ("attn_hc", "ffn_hc")[name])]
        for metric, value in want.items():
            assert at[at.metric == metric].value.item() == pytest.approx(value, rel=1e-9)
    assert want["hc_gain_fwd"] > 1.5  # unconstrained mixing amplifies


def test_mhc_stays_doubly_stochastic_where_hc_does_not():
    gains = {}
    for placement in ("hc", "mhc"):
        rows, _, _ = run(trained_looking(placement, depth=8))
        last = rows[(rows.metric == "hc_gain_fwd") & (rows.layer == 7)].value.max()
        err = rows[rows.metric == "hc_ds_error"].value.max()
        gains[placement] = (last, err)
    assert gains["mhc"][0] == pytest.approx(1.0, abs=1e-9)
    assert gains["mhc"][1] < 1e-9
    assert gains["hc"][0] > 2 and gains["hc"][1] > 0.1


def test_deepseek_v4_copies_and_mixing_are_recorded():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV4Config"):
        pytest.skip("transformers without DeepSeek-V4")
    cfg = tiny_hf_config("deepseek_v4")
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(cfg)
    probe = Probe(model, quantities=("act_grad_norm", "hc_mixing")).attach()
    block = probe.blocks[0]
    assert block.streams == ("h0", "h1", "h2", "h3") and block.stacked
    assert list(block.mixers) == ["attn_hc", "ffn_hc"]
    assert "attn_hc" not in block.sublayers and "ffn_hc" not in block.sublayers
    outs = []
    hook = model.model.layers[1].register_forward_hook(keeper(outs))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    hook.remove()
    rows = pd.DataFrame(probe.step())
    got = rows[(rows.metric == "act_grad_norm") & (rows.sublayer == "block") & (rows.layer == 1)]
    for i in range(4):
        want = float(outs[0].grad[..., i, :].double().pow(2).sum(-1).mean().sqrt())
        assert got[got.stream == f"h{i}"].value.item() == pytest.approx(want, rel=1e-5)
    gain = rows[rows.metric == "hc_gain_fwd"].value
    assert len(gain) == 4 and gain.between(1 - 1e-4, 1 + 1e-4).all()  # Sinkhorn: near 1


def test_mixing_matrix_is_comb_when_a_sequence_has_n_tokens():
    """post (B, T, n) also ends in (n, n) at T = n: the mixing is the higher-rank comb."""
    from residual_probe.probe.quantities.hc_mixing import mixing_matrix

    model = build_model(placement="mhc", **SMALL)
    post, comb, collapsed = model.decoder.layers[0].attn_hc(torch.randn(2, 4, 4, 16))
    assert post.shape[-2:] == (4, 4)
    assert mixing_matrix((post, comb, collapsed), 4) is comb
