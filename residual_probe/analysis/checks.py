"""Each theory statement compared with a measurement: predicted, measured, agreement.

A check takes measured arrays (numpy) and returns a `Check` (one table row) plus, where a figure
needs them, the curves it compared. The verdict is decided here from stated tolerances, never
in plotting code. The measurement decides: a disagreement is reported with its numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from . import theory
from .fits import geometric_decay, line_fit, loglog_slope, power_law_scale
from .summary import geometric_mean

W2_SLOPE_TOL = 0.15  # the issue's acceptance band around Theorem 1's slopes (0 and -1/2)
POSTLN_FLAT_TOL = 0.01  # |E||h||^2/d - 1| on Post-LN block outputs: LN eps 1e-5 moves it by ~1e-5
FLOOR_RATIO = 0.1  # "bounded below": the smallest block gradient is at least 10 % of the largest


@dataclass(frozen=True)
class Check:
    statement: str
    setting: str  # e.g. "xiong/encoder"
    placement: str
    predicted: str
    measured: str
    agreement: str  # "yes", "no", or "shape only: ..." when the form holds but a constant differs

    def to_row(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One printable line: [agreement] statement (setting, placement): predicted ...; measured ..."""
        return (f"[{self.agreement}] {self.statement} ({self.setting}, {self.placement}): "
                f"predicted {self.predicted}; measured {self.measured}")


def agreement(ok: bool) -> str:
    """The agreement of a pass/fail comparison: "yes" or "no"."""
    return "yes" if ok else "no"


def fmt(x: float, digits: int = 3) -> str:
    """A measured number for a check's text: `digits` significant digits, "nan" when not finite."""
    return f"{x:.{digits}g}" if math.isfinite(x) else "nan"


def lemma2(setting: str, placement: str, norm_sq: np.ndarray, v0: float) -> Check:
    """Xiong Lemma 2 on block outputs: norm_sq (seeds, N) of E||h_k||^2/d, v0 the embedding's.

    Pre-LN: the per-block growth (slope of a line in l = k + 1) must lie in [1/2, 3/2].
    Post-LN: flat at 1 on block outputs (the 3/2 of the lemma is before the LN).
    """
    mean = norm_sq.mean(0)
    l = np.arange(1, len(mean) + 1)
    if placement == "pre-ln":
        fit = line_fit(l, mean)
        slope, r2 = fit.slope, fit.r2
        ok = 0.5 <= slope <= 1.5
        return Check("Xiong L2: Pre-LN E||x_l||^2/d grows linearly, +1/2..+3/2 per block", setting, placement,
                     f"v0 + [0.5, 1.5] l (v0={v0:.3g})", f"v0={v0:.3g}, +{slope:.3g} per block, R^2={r2:.3f}",
                     "yes" if ok and r2 > 0.95 else ("shape only: linear, rate outside [0.5, 1.5]" if r2 > 0.95 else "no"))
    dev = float(np.max(np.abs(mean - 1.0)))
    return Check("Xiong L2: Post-LN E||x_l||^2/d flat", setting, placement, "1 (block output, after LN)",
                 f"{mean.min():.4g}..{mean.max():.4g}", "yes" if dev < POSTLN_FLAT_TOL else "no")


def theorem1(setting: str, placement: str, depths, w2: np.ndarray) -> tuple[Check, dict]:
    """Xiong Theorem 1: log-log slope of the last block's W2 gradient norm, w2 (seeds, depths)."""
    fit = loglog_slope(depths, w2)
    pred = theory.XIONG_W2_SLOPE[placement]
    ok = abs(fit.slope - pred) <= W2_SLOPE_TOL
    scale = power_law_scale(depths, w2, pred)  # the O's constant, with the slope held at the prediction
    curve = theory.xiong_w2_curve(depths, placement, scale)
    n_depths = len(np.unique(np.asarray(depths)))
    if n_depths < 3:  # a line through two points: no spread to quote, and no test of the power law
        measured = f"slope {fit.slope:.3f} from only {n_depths} depths (no uncertainty; give 3 or more)"
        agreement = ("yes" if ok else "no") + f" (from {n_depths} depths only)"
    else:
        measured, agreement = f"slope {fit.slope:.3f} +- {fit.stderr:.3f} from {n_depths} depths", "yes" if ok else "no"
    check = Check(f"Xiong T1: {placement} last-block W2 grad ~ L^{pred:g}", setting, placement,
                  f"slope {pred:g} (+-{W2_SLOPE_TOL})", measured, agreement)
    return check, {"depths": np.asarray(depths), "w2": w2, "predicted": curve, "slope": fit.slope}


def residual_gradient(setting: str, stack: str, placement: str, grads: np.ndarray, sublayers: int) -> tuple[Check, dict]:
    """ResiDual's gradient statements on per-block gradient norms grads (seeds, N).

    Post-LN: gradient decays toward the input at 2^(-s/2) per block (s sublayers), shape
    (1/2)^(m/2) e^sqrt(m); agreement "yes" when the bootstrap interval of the fitted rate holds
    the prediction, "shape only" when it vanishes (interval below 1) at another rate.
    Other placements (ResiDual, Pre-LN): bounded below, min/max block norm >= FLOOR_RATIO.
    """
    fit = geometric_decay(grads)
    n = grads.shape[1]
    mean = geometric_mean(grads)  # over seeds, per block
    if placement == "post-ln":
        pred_rate = theory.postln_gradient_rate_per_block(sublayers)
        m = sublayers * (n - 1 - np.arange(n))
        curve = mean[-1] * theory.postln_gradient_shape(m)
        measured = f"{fit.rate:.3g} [{fit.low:.3g}, {fit.high:.3g}] per block; block 0/last {fit.first_over_last:.2g}"
        if fit.low <= pred_rate <= fit.high:
            agree = "yes"
        elif fit.high < 1:
            agree = f"shape only: vanishes, {'slower' if fit.rate > pred_rate else 'faster'} than predicted"
        else:
            agree = "no: does not vanish"
        check = Check("ResiDual: Post-LN gradient decays exponentially toward the input", setting + "/" + stack,
                      placement, f"{pred_rate:.3g} per block", measured, agree)
    else:
        ratio = float(mean.min() / mean.max())
        curve = theory.residual_gradient_floor(np.arange(n), mean.min())
        check = Check(f"ResiDual: {placement} per-block gradient bounded below", setting + "/" + stack, placement,
                      f"min/max block norm >= {FLOOR_RATIO}", f"min/max {ratio:.3g}; rate {fit.rate:.3g} per block",
                      "yes" if ratio >= FLOOR_RATIO else "no")
    return check, {"grads": grads, "predicted": curve, "fit": fit}


def collapse_toy_rtol(d: int, tokens: int) -> float:
    """Tolerance of the toy model's Monte-Carlo against the closed forms, width d, `tokens` samples:
    4 standard errors of a mean of |Gaussian| (relative sd sqrt(pi/2 - 1)) over d * tokens
    coordinates, plus 2/d for LN's O(1/d) finite-width bias."""
    return 4 * math.sqrt(math.pi / 2 - 1) / math.sqrt(d * tokens) + 2 / d


def collapse_toy(placement: str, measured: dict[str, np.ndarray], predicted: dict[str, np.ndarray], rtol: float) -> Check:
    """Monte-Carlo of the toy model against the closed forms: max relative error over blocks."""
    err = max(float(np.max(np.abs(measured[m] / predicted[m] - 1))) for m in measured)
    shape = {"pre-ln": "cos -> 1, ln_update ~ sqrt(2/(pi k))", "post-ln": "constant in k",
             "residual": "constant in k (x stream)"}[placement]
    return Check("ResiDual collapse (toy, Gaussian updates): closed forms", "monte-carlo", placement, shape,
                 f"max rel. error {err:.2%} (tolerance {rtol:.2%})", "yes" if err <= rtol else "no")


def collapse_model(setting: str, placement: str, ln_update: np.ndarray) -> Check:
    """The collapse shape on a real model at init: log-log slope of ln_update (seeds, N) in k.

    Predicted -1/2 for Pre-LN (O(1/sqrt k)), 0 for Post-LN and ResiDual's x stream; fitted over
    k >= 2 (block 1 starts from the embedding, not from the steady state).
    """
    k = np.arange(1, ln_update.shape[1] + 1)
    fit = loglog_slope(k[1:], ln_update[:, 1:])
    pred = -0.5 if placement == "pre-ln" else 0.0
    return Check("ResiDual collapse on the model: ln_update ~ k^slope", setting, placement, f"slope {pred:g}",
                 f"slope {fit.slope:.3f} +- {fit.stderr:.3f}", "yes" if abs(fit.slope - pred) <= W2_SLOPE_TOL else "no")


def adam(g_healthy: float, g_small: np.ndarray, measured_ratio: np.ndarray, eps: float) -> Check:
    """Adam's step-size condition number against `theory.adam_step_ratio`, max relative error 10 %:
    with beta2 = 0.999, v_hat averages ~1000 squared Gaussian samples, so each coordinate's RMS
    scatters by ~1/sqrt(2000) = 2.2 % and a ratio of two by ~3 %; 10 % is about 3 sd."""
    pred = theory.adam_step_ratio(g_healthy, g_small, eps)
    err = float(np.max(np.abs(measured_ratio / pred - 1)))
    at_zero = float(theory.adam_step_ratio(g_healthy, 0.0, eps))
    return Check("ResiDual: Adam's condition number at g=0 ~ alpha sqrt(d)/eps", "adam", "-",
                 f"(g + eps)/eps = {at_zero:.3g} at g_small=0", f"max rel. error {err:.1%} over the sweep",
                 "yes" if err <= 0.1 else "no")
