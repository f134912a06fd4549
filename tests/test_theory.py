"""Closed forms of analysis.theory against Monte-Carlo, and the curves' stated shapes."""

import math

import numpy as np
import pytest
import torch

from residual_probe.analysis import metrics as M
from residual_probe.analysis import theory as T

D, TOKENS, BLOCKS = 1024, 64, 24
# Tolerance: each measured value is a mean of |Gaussian|-like terms over TOKENS * D coordinates;
# sd(|Z|)/E|Z| = sqrt(pi/2 - 1) = 0.755, so 4 standard errors are 4 * 0.755 / sqrt(TOKENS * D)
# = 1.2 %; the closed forms are d -> infinity limits, off by O(1/d) (LN's sample mean and
# variance), allowed as 2/D. The cosine and relative update fluctuate less, so this bounds all three.
RTOL = 4 * math.sqrt(math.pi / 2 - 1) / math.sqrt(TOKENS * D) + 2 / D
METRICS = {
    "cos_adjacent": M.cos_adjacent,
    "ln_update": M.ln_update,
    "relative_update": M.relative_update,
}


def measured(X):
    return {
        name: np.array([fn(X[i - 1], X[i]).item() for i in range(1, len(X))])
        for name, fn in METRICS.items()
    }


@pytest.mark.parametrize("placement", ["pre-ln", "post-ln", "residual"])
@pytest.mark.parametrize("sigma2,v1", [(1.0, 1.0), (0.5, 2.0)])
def test_collapse_closed_forms_match_monte_carlo(placement, sigma2, v1):
    X = T.simulate_collapse(placement, BLOCKS, D, TOKENS, sigma2=sigma2, v1=v1, seed=3)
    k = np.arange(1, BLOCKS + 1)
    pred = T.collapse_prediction(placement, k, sigma2, v1)
    for name, values in measured(X).items():
        np.testing.assert_allclose(values, pred[name], rtol=RTOL, err_msg=f"{placement} {name}")


def test_collapse_shapes():
    k = np.arange(1, 201)
    pre = T.collapse_prediction("pre-ln", k)
    post = T.collapse_prediction("post-ln", k, sigma2=0.5)
    np.testing.assert_allclose(
        pre["cos_adjacent"], np.sqrt(k / (k + 1))
    )  # docs/design.md 3.4: sqrt(k/(k+1))
    # O(1/sqrt(k)): sqrt(k) * ln_update tends to sqrt(2/pi)
    assert math.sqrt(200) * pre["ln_update"][-1] == pytest.approx(math.sqrt(2 / math.pi), rel=2e-3)
    assert np.all(np.diff(pre["ln_update"]) < 0)
    np.testing.assert_allclose(
        post["cos_adjacent"][1:], 1 / math.sqrt(1.5)
    )  # 1/sqrt(1+sigma^2), flat
    assert np.ptp(post["ln_update"][1:]) == 0.0
    # Monte-Carlo log-log slope of the Pre-LN normalized update between k = 8 and 24: -1/2 asymptotically;
    # the exact curve's local slope there is -0.48, and MC must agree with it, not only with -1/2
    X = T.simulate_collapse("pre-ln", BLOCKS, D, TOKENS, seed=4)
    mc = measured(X)["ln_update"][7:]
    kk = np.arange(8, BLOCKS + 1)
    mc_slope = np.polyfit(np.log(kk), np.log(mc), 1)[0]
    exact_slope = np.polyfit(
        np.log(kk), np.log(T.collapse_prediction("pre-ln", kk)["ln_update"]), 1
    )[0]
    assert mc_slope == pytest.approx(exact_slope, abs=0.03)
    assert -0.55 < exact_slope < -0.45


def test_lemma2_band_and_theorem1_slopes():
    lo, hi = T.xiong_lemma2_preln_band([0, 2, 10], v0=1.0)
    np.testing.assert_allclose(lo, [1, 2, 6])
    np.testing.assert_allclose(hi, [1, 4, 16])
    # the general band is the lemma's in its setting (square FFN, Xavier), other sizes change the constants
    np.testing.assert_allclose(T.preln_norm_band([0, 2, 10], 1.0, 128, 128, "xiong"), (lo, hi))
    assert T.postln_final_ln_input(128, 128, "xiong") == 1.5
    assert T.ffn_gain(128, 512, "xiong") == pytest.approx(0.32)
    assert T.ffn_gain(128, 512, "fairseq") == pytest.approx(129 / (18 * 128) + 1 / 1536)
    L = np.array([6, 12, 24, 48])
    assert np.polyfit(np.log(L), np.log(T.xiong_w2_curve(L, "pre-ln", 3.0)), 1)[0] == pytest.approx(
        -0.5
    )
    assert np.all(T.xiong_w2_curve(L, "post-ln", 3.0) == 3.0)
    with pytest.raises(ValueError):
        T.xiong_w2_curve(L, "residual")


def _ffn_mc(d, ffn, init, draws=40, tokens=64, seed=0):
    """E||FFN(x)||^2/d over weight draws of our own modules and their init, x with ||x||^2 = d."""
    from residual_probe.models.init import _init_attention_fairseq  # noqa: F401 (same module as the FFN init)
    from residual_probe.models.layers import FeedForward

    torch.manual_seed(seed)
    vals = []
    for _ in range(draws):
        ffn_mod = FeedForward(d, ffn, 0.0, 1, "layernorm").double()
        if init == "xiong":
            for lin in (ffn_mod.fc1, ffn_mod.fc2):
                torch.nn.init.xavier_uniform_(lin.weight)
                torch.nn.init.zeros_(lin.bias)
        x = M.layer_norm(torch.randn(tokens, d, dtype=torch.float64))
        with torch.no_grad():
            vals.append(ffn_mod.branch(x, None).pow(2).mean().item())
    return float(np.mean(vals)), float(np.std(vals) / np.sqrt(draws))


@pytest.mark.parametrize(
    "d,ffn,init", [(64, 64, "xiong"), (64, 256, "xiong"), (64, 256, "fairseq"), (32, 32, "fairseq")]
)
def test_ffn_gain_against_monte_carlo_of_the_reference_modules(d, ffn, init):
    mean, se = _ffn_mc(d, ffn, init)
    assert abs(mean - T.ffn_gain(d, ffn, init)) < 4 * se + 1e-3, (
        mean,
        se,
        T.ffn_gain(d, ffn, init),
    )


@pytest.mark.parametrize("init", ["xiong", "fairseq"])
def test_attention_gain_range_against_monte_carlo(init):
    """Identical tokens reach the top of the range, independent random tokens nearly its bottom."""
    from residual_probe.models.init import _init_attention_fairseq, _init_attention_xiong
    from residual_probe.models.layers import Attention

    d, T_tok, draws = 64, 128, 40
    torch.manual_seed(1)
    same, indep = [], []
    for _ in range(draws):
        attn = Attention(d, 4, 0.0, False, 1, "layernorm").double()
        (_init_attention_xiong if init == "xiong" else _init_attention_fairseq)(attn)
        x = M.layer_norm(torch.randn(1, T_tok, d, dtype=torch.float64))
        with torch.no_grad():
            same.append(attn.branch(x[:, :1].expand(1, T_tok, d), None).pow(2).mean().item())
            indep.append(attn.branch(x, None).pow(2).mean().item())
    lo, hi = T.attention_gain_range(d, init)
    assert np.mean(same) == pytest.approx(hi, rel=0.08)
    assert (
        lo <= np.mean(indep) < lo + (hi - lo) * 3 / T_tok * (4 if init == "fairseq" else 1) + 0.02
    )


def test_postln_final_ln_input_in_the_lemma_setting_on_the_model():
    """Xiong's Lemma 2 where it puts it: the input of the last LN of a Post-LN block is 3/2 per
    dimension (square FFN, Xiong init), not the block output (an LN output, 1 by construction)."""
    from residual_probe.jobs.bounds import BoundsSpec, measure_bounds

    spec = BoundsSpec(d_model=64, ffn=64, heads=4, batch=4, seq_len=16)
    vals = []
    for seed in range(4):
        rows = measure_bounds(
            spec.config("xiong", "encoder", "post-ln", 6, ffn=64), seed, spec.batch, spec.seq_len
        )
        vals += [r["value"] for r in rows if r["metric"] == "final_ln_input_sq_per_dim"]
    se = np.std(vals) / np.sqrt(len(vals))
    assert abs(np.mean(vals) - 1.5) < 4 * se + 0.01, (np.mean(vals), se)


def test_postln_gradient_shape():
    m = np.arange(0, 400)
    g = T.postln_gradient_shape(m)
    assert g[0] == 1.0
    assert g[400 - 1] / g[400 - 2] == pytest.approx(
        2**-0.5 * math.exp(1 / (2 * math.sqrt(398))), rel=1e-3
    )
    assert T.postln_gradient_rate_per_block(3) == pytest.approx(2**-1.5)
    assert np.all(T.residual_gradient_floor(np.arange(7), 2.5) == 2.5)
    # over the same 48 blocks the curve itself decays by 0.434 (3 sublayers) and 0.592 (2), not 0.354 and 0.5
    assert T.postln_curve_rate(48, 3) == pytest.approx(0.434, abs=1e-3)
    assert T.postln_curve_rate(48, 2) == pytest.approx(0.592, abs=1e-3)


def test_gradient_profiles_are_properties_of_the_placements():
    assert T.gradient_profile("post-ln").kind == "decay"
    assert T.gradient_profile("pre-ln").kind == T.gradient_profile("residual").kind == "floor"
    for p in ("deepnorm", "b2t", "sandwich", "peri-ln", "mix-ln", "lns", "rezero", "unknown"):
        assert T.gradient_profile(p) is None, p


def test_collapse_closed_form_from_relative_update_matches_monte_carlo():
    """Pre-LN toy with a large v1 and small sigma2 (a fairseq-init-like stream): the closed form written
    with the measured relative update reproduces ln_update, and its slope is far from -1/2."""
    X = T.simulate_collapse("pre-ln", 47, D, TOKENS, sigma2=0.25, v1=1.5, seed=5)
    mc = measured(X)
    closed = T.collapse_from_relative_update(mc["relative_update"])
    np.testing.assert_allclose(mc["ln_update"], closed["ln_update"], rtol=RTOL + 0.01)
    k = np.arange(2, 48)
    slope = T.loglog_slope_of(k, mc["ln_update"][1:])
    assert -0.45 < slope < -0.3  # the toy model's own finite-depth slope with v1/sigma2 = 6


def test_adam_condition_number_against_torch_adam():
    """kappa = d||u||/d(scale) of torch Adam's update: the closed form at every gradient scale, and the
    paper's alpha sqrt(d)/eps (alpha the learning rate) once the gradient is far below eps."""
    alpha, eps, n = 1e-4, 1e-6, 1024
    z = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def torch_kappa(g, h=1e-4):
        norms = []
        for s in (1.0, 1.0 + h):
            w = torch.zeros(n, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.Adam([w], lr=alpha, eps=eps)
            w.grad = s * g
            opt.step()
            norms.append(w.detach().norm().item())
        return (norms[1] - norms[0]) / (h * g.pow(2).mean().sqrt().item())

    for rms in (1e-10, 1e-8, 1e-6, 1e-4):
        g = rms * z
        assert torch_kappa(g) == pytest.approx(
            T.adam_update_condition(g.numpy(), alpha, eps), rel=1e-3
        )
    assert T.residual_adam_condition(1e-4, 1024, 1e-6) == pytest.approx(3200)
    assert torch_kappa(1e-10 * z) == pytest.approx(3200, rel=1e-3)  # vanished: the paper's number
    assert torch_kappa(1e-3 * z) < 0.01 * 3200  # healthy: the step ignores the gradient's scale
