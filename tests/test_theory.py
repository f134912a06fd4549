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
METRICS = {"cos_adjacent": M.cos_adjacent, "ln_update": M.ln_update, "relative_update": M.relative_update}


def measured(X):
    return {name: np.array([fn(X[i - 1], X[i]).item() for i in range(1, len(X))]) for name, fn in METRICS.items()}


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
    np.testing.assert_allclose(pre["cos_adjacent"], np.sqrt(k / (k + 1)))  # DESIGN's sqrt(k/(k+1))
    # O(1/sqrt(k)): sqrt(k) * ln_update tends to sqrt(2/pi)
    assert math.sqrt(200) * pre["ln_update"][-1] == pytest.approx(math.sqrt(2 / math.pi), rel=2e-3)
    assert np.all(np.diff(pre["ln_update"]) < 0)
    np.testing.assert_allclose(post["cos_adjacent"][1:], 1 / math.sqrt(1.5))  # 1/sqrt(1+sigma^2), flat
    assert np.ptp(post["ln_update"][1:]) == 0.0
    # Monte-Carlo log-log slope of the Pre-LN normalized update between k = 8 and 24: -1/2 asymptotically;
    # the exact curve's local slope there is -0.48, and MC must agree with it, not only with -1/2
    X = T.simulate_collapse("pre-ln", BLOCKS, D, TOKENS, seed=4)
    mc = measured(X)["ln_update"][7:]
    kk = np.arange(8, BLOCKS + 1)
    mc_slope = np.polyfit(np.log(kk), np.log(mc), 1)[0]
    exact_slope = np.polyfit(np.log(kk), np.log(T.collapse_prediction("pre-ln", kk)["ln_update"]), 1)[0]
    assert mc_slope == pytest.approx(exact_slope, abs=0.03)
    assert -0.55 < exact_slope < -0.45


def test_lemma2_band_and_theorem1_slopes():
    lo, hi = T.xiong_lemma2_preln_band([0, 2, 10], v0=1.0)
    np.testing.assert_allclose(lo, [1, 2, 6])
    np.testing.assert_allclose(hi, [1, 4, 16])
    assert np.all(T.xiong_lemma2_postln(np.arange(5)) == 1.0)
    assert np.all(T.xiong_lemma2_postln(np.arange(5), before_ln=True) == 1.5)
    L = np.array([6, 12, 24, 48])
    assert np.polyfit(np.log(L), np.log(T.xiong_w2_curve(L, "pre-ln", 3.0)), 1)[0] == pytest.approx(-0.5)
    assert np.all(T.xiong_w2_curve(L, "post-ln", 3.0) == 3.0)
    with pytest.raises(ValueError):
        T.xiong_w2_curve(L, "residual")


def test_postln_gradient_shape():
    m = np.arange(0, 400)
    g = T.postln_gradient_shape(m)
    assert g[0] == 1.0
    assert g[400 - 1] / g[400 - 2] == pytest.approx(2**-0.5 * math.exp(1 / (2 * math.sqrt(398))), rel=1e-3)
    assert T.postln_gradient_rate_per_block(3) == pytest.approx(2**-1.5)
    assert np.all(T.residual_gradient_floor(np.arange(7), 2.5) == 2.5)


def test_adam_condition_number_against_torch_adam():
    # Two coordinates with stationary Gaussian gradients of RMS 1e-1 (healthy) and 1e-12 (vanished):
    # Adam's effective step lr/(sqrt(v_hat)+eps) differs between them by adam_step_ratio.
    g = torch.Generator().manual_seed(0)
    eps, steps = 1e-8, 3000
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1.0, betas=(0.9, 0.999), eps=eps)
    scale = torch.tensor([1e-1, 1e-12], dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        w.grad = scale * torch.randn(2, generator=g, dtype=torch.float64)
        opt.step()
    v_hat = opt.state[w]["exp_avg_sq"] / (1 - 0.999**steps)
    step_size = 1.0 / (v_hat.sqrt() + eps)
    measured_ratio = (step_size[1] / step_size[0]).item()
    # v_hat is an EMA over ~1000 squared samples: RMS within ~6 % (1/sqrt(2*1000) * 2 sd of a chi-square)
    assert measured_ratio == pytest.approx(T.adam_step_ratio(1e-1, 1e-12, eps), rel=0.1)
    # the paper's alpha sqrt(d)/eps is the same number when the healthy gradient scale is alpha sqrt(d)
    alpha, d = 1e-1 / math.sqrt(512), 512
    assert T.residual_adam_condition(alpha, d, eps) == pytest.approx(T.adam_step_ratio(1e-1, 0.0, eps), rel=1e-6)
