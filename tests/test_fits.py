"""Fits of analysis.fits (scipy) and the gradient verdicts of analysis.gradients on curves with known rates and slopes."""

import math

import numpy as np
import pytest

from residual_probe.analysis import fits as F
from residual_probe.analysis import theory as T
from residual_probe.analysis.gradients import theory_overlay
from residual_probe.analysis.verdicts import decay_verdict


def test_geometric_decay_recovers_rate_and_interval():
    k = np.arange(48)
    rng = np.random.default_rng(0)
    clean = 2.0 * 0.88 ** (47 - k)  # vanishing toward the input: 0.88 per block
    noisy = clean * np.exp(0.05 * rng.standard_normal((5, 48)))
    fit = F.geometric_decay(noisy)
    assert fit.rate == pytest.approx(0.88, abs=2e-3)
    assert fit.low < 0.88 < fit.high and fit.high - fit.low < 0.01
    assert fit.first_over_last == pytest.approx(0.88**47, rel=0.1)
    assert "vanish toward the input" in decay_verdict(fit, 48)
    exact = F.geometric_decay(clean)
    assert exact.rate == pytest.approx(0.88) and exact.low == exact.high == exact.rate


def test_verdicts_for_growing_and_balanced_profiles():
    k = np.arange(12)
    assert "grow toward the input" in decay_verdict(F.geometric_decay(1.3 ** (11 - k)), 12)
    assert decay_verdict(F.geometric_decay(1.01 ** (11 - k)), 12).startswith("balanced")


def test_bad_values_raise_fit_error():
    with pytest.raises(F.FitError, match="non-finite"):
        F.geometric_decay([1.0, math.nan, 2.0])
    with pytest.raises(F.FitError, match="at least 2 layers"):
        F.geometric_decay([1.0])
    with pytest.raises(F.FitError, match="distinct"):
        F.loglog_slope([4, 4], [1.0, 2.0])


def test_loglog_slope():
    L = np.array([6, 12, 24, 48])
    fit = F.loglog_slope(L, 3.0 * L**-0.5)
    assert fit.slope == pytest.approx(-0.5) and math.exp(fit.intercept) == pytest.approx(3.0)
    assert fit.stderr == pytest.approx(0.0, abs=1e-12)
    seeds = 3.0 * L**-0.5 * np.exp(0.1 * np.random.default_rng(1).standard_normal((4, 4)))
    fit = F.loglog_slope(L, seeds)
    assert abs(fit.slope + 0.5) < 3 * fit.stderr + 0.05


def test_gradient_theory_overlay():
    rows = []
    for p, rate in (("post-ln", 0.5), ("residual", 1.0), ("deepnorm", 0.9), ("b2t", 0.9)):
        for seed in range(2):
            for k in range(6):
                rows.append(
                    {
                        "placement": p,
                        "seed": seed,
                        "step": 0,
                        "stack": "decoder",
                        "layer": k,
                        "sublayer": "block",
                        "param_grad_norm": 1e-2 * rate ** (5 - k),
                    }
                )
                for s in ("self_attn", "cross_attn", "ffn"):
                    rows.append(
                        {
                            "placement": p,
                            "seed": seed,
                            "step": 0,
                            "stack": "decoder",
                            "layer": k,
                            "sublayer": s,
                            "param_grad_norm": 1.0,
                        }
                    )
    curves, verdicts = theory_overlay(rows)
    v = {x["placement"]: x for x in verdicts}
    # the paper's curve's own rate over these 6 blocks (3 sublayers each), not its asymptote 2^-1.5
    assert v["post-ln"]["rate"] == pytest.approx(0.5)
    assert v["post-ln"]["predicted_rate"] == pytest.approx(T.postln_curve_rate(6, 3))
    assert v["post-ln"]["predicted_rate"] > 2**-1.5 + 0.1
    # DeepNorm and B2T are not Post-LN for the theory: no source gives them a curve (the old overlay drew Post-LN's)
    for p in ("deepnorm", "b2t"):
        assert math.isnan(v[p]["predicted_rate"]) and v[p]["source"] == ""
        assert all(math.isnan(c["predicted"]) for c in curves if c["placement"] == p)
    assert "ResiDual" in v["residual"]["source"]
    assert v["residual"]["rate"] == pytest.approx(1.0) and v["residual"]["verdict"].startswith(
        "balanced"
    )
    post = [c for c in curves if c["placement"] == "post-ln"]
    assert post[-1]["predicted"] == pytest.approx(1e-2) and post[-1]["fitted"] == pytest.approx(
        1e-2
    )
    assert post[0]["fitted"] == pytest.approx(1e-2 * 0.5**5)
