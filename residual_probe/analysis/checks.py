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
from .fits import geometric_decay, loglog_slope
from .verdicts import VANISHING_RATIO

# Theorem 1 bounds the slope from above: consistent when the slope's 95 % interval reaches its
# exponent or below (analysis.fits.SlopeFit.interval, Student t)
T1_LEVEL = 0.95
SHAPE_SLOPE_TOL = 0.15  # a collapse slope within 0.15 of the predicted power (0, -1/2) agrees
N_SE = 3.0  # a prediction agrees when it lies within 3 standard errors of the measured mean
# kappa within 3 % of alpha sqrt(n)/eps in blocks whose gradient RMS is below eps/1000. The
# approximation is first order in rms/eps: kappa / (alpha sqrt(n)/eps) ~ 1 - c rms/eps, c = 3 for
# Gaussian gradients (theory.adam_update_condition) and about 7 for a Post-LN decoder's (heavier
# tails: max|g_i| ~ 11 rms), so at eps/1000 it is within 1 %.
ADAM_RTOL = 0.03
ADAM_REGIME = 1e-3  # "vanished": rms(g) < ADAM_REGIME * eps
# The closed form from a model's own update sizes must give the measured ln_update slope within 0.05
# (a tenth of the -1/2 it is meant to explain); its per-block error is reported beside it.
COLLAPSE_SLOPE_TOL = 0.05


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
        return (
            f"[{self.agreement}] {self.statement} ({self.setting}, {self.placement}): "
            f"predicted {self.predicted}; measured {self.measured}"
        )


def agreement(ok: bool) -> str:
    """The agreement of a pass/fail comparison: "yes" or "no"."""
    return "yes" if ok else "no"


def fmt(x: float, digits: int = 3) -> str:
    """A measured number for a check's text: `digits` significant digits, "nan" when not finite."""
    return f"{x:.{digits}g}" if math.isfinite(x) else "nan"


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64).ravel()
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def lemma2_postln(
    setting: str, final_ln_input: np.ndarray, d: int, ffn: int, init: str
) -> tuple[Check, dict]:
    """Xiong Lemma 2, Post-LN: E||x||^2/d at the input of a block's last LN (x + FFN(x)).

    final_ln_input: (seeds, N) of that quantity per block. The lemma states it for the last
    block; every block's FFN has its own independent weights and an LN-output input, so all
    N * seeds values share the prediction `theory.postln_final_ln_input` (3/2 in the lemma's
    setting, FFN = d, init "xiong"). Agreement: the prediction within N_SE standard errors of
    the mean over all values, and the last block's seed mean within N_SE of its own spread.
    """
    pred = theory.postln_final_ln_input(d, ffn, init)
    mean, se = _mean_se(final_ln_input)
    last, last_se = _mean_se(final_ln_input[:, -1])
    spread = float(np.std(final_ln_input, ddof=1)) / np.sqrt(final_ln_input.shape[0])
    ok = abs(mean - pred) <= N_SE * se and abs(last - pred) <= N_SE * max(last_se, spread)
    lemma = init == "xiong" and ffn == d
    statement = (
        "Xiong L2: Post-LN E||x||^2/d = 3/2 at the input of the final LN"
        if lemma
        else f"Xiong L2 (derived for FFN {ffn}, {init} init): Post-LN E||x||^2/d at the final LN's input"
    )
    check = Check(
        statement,
        setting,
        "post-ln",
        f"{pred:.4g} (1 + FFN gain; d {d}, FFN {ffn})",
        f"last block {last:.4g}; all blocks {mean:.4g} +- {se:.2g}",
        "yes" if ok else "no",
    )
    return check, {"values": final_ln_input, "predicted": pred}


def lemma2_preln(
    setting: str, norm_sq: np.ndarray, v0: float, d: int, ffn: int, init: str
) -> tuple[Check, dict]:
    """Xiong Lemma 2, Pre-LN: E||x_l||^2/d of the stream after l = 1..N blocks, norm_sq (seeds, N).

    Predicted band `theory.preln_norm_band` (the lemma's (1 + l/2)..(1 + 3l/2) in its setting,
    init "xiong" with FFN = d; derived constants otherwise), from the embedding's measured v0.
    Agreement: every block's seed mean inside the band, widened by N_SE standard errors.
    """
    ell = np.arange(1, norm_sq.shape[1] + 1)
    lo, hi = theory.preln_norm_band(ell, v0, d, ffn, init)
    mean = norm_sq.mean(0)
    se = norm_sq.std(0, ddof=1) / np.sqrt(len(norm_sq)) if len(norm_sq) > 1 else np.zeros_like(mean)
    inside = (mean >= lo - N_SE * se) & (mean <= hi + N_SE * se)
    slope = float(np.polyfit(ell, mean, 1)[0])
    g_lo, g_hi = lo[0] - v0, hi[0] - v0  # per-block growth at l = 1
    lemma = init == "xiong" and ffn == d
    statement = (
        "Xiong L2: Pre-LN (1 + l/2) <= E||x_l||^2/d <= (1 + 3l/2)"
        if lemma
        else f"Xiong L2 (derived for FFN {ffn}, {init} init): Pre-LN E||x_l||^2/d in a linear band"
    )
    check = Check(
        statement,
        setting,
        "pre-ln",
        f"v0 + [{g_lo:.3g}, {g_hi:.3g}] l (v0={v0:.3g})",
        f"+{slope:.3g} per block; {int(inside.sum())}/{len(ell)} blocks inside",
        "yes" if inside.all() else "no",
    )
    return check, {"norm_sq": norm_sq, "v0": v0, "low": lo, "high": hi}


def theorem1(setting: str, placement: str, depths, w2: np.ndarray) -> tuple[Check, dict]:
    """Xiong Theorem 1: log-log slope of the last block's W2 gradient norm, w2 (seeds, depths).

    The theorem is an upper bound, O(d sqrt(ln d)) for Post-LN and O(d sqrt(ln d / L)) for Pre-LN:
    a slope at or below its exponent (0, -1/2) is consistent with it; only a slope whose
    T1_LEVEL interval lies wholly above the exponent contradicts it. The row says which of the
    three it is: at the bound (the interval holds the exponent), steeper than it, or shallower.
    """
    fit = loglog_slope(depths, w2)
    pred = theory.XIONG_W2_SLOPE[placement]
    # the O's constant, fitted with the slope held at the prediction: geometric mean of w2 / L^pred
    scale = float(np.exp(np.mean(np.log(w2) - pred * np.log(np.asarray(depths, dtype=np.float64)))))
    curve = theory.xiong_w2_curve(depths, placement, scale)
    n_depths = len(np.unique(np.asarray(depths)))
    low, high = fit.interval(T1_LEVEL)
    if n_depths < 3:  # a line through two points: no spread to quote, and no test of the power law
        measured = (
            f"slope {fit.slope:.3f} from only {n_depths} depths (no uncertainty; give 3 or more)"
        )
        agreement = ("yes" if fit.slope <= pred else "no") + f" (from {n_depths} depths only)"
    else:
        measured = (
            f"slope {fit.slope:.3f} +- {fit.stderr:.3f} [{low:.3f}, {high:.3f}] "
            f"from {n_depths} depths"
        )
        if low > pred:
            agreement = f"no: shallower than L^{pred:g}"
        elif high < pred:
            agreement = f"yes: below the bound (steeper than L^{pred:g})"
        else:
            agreement = "yes"
    check = Check(
        f"Xiong T1: {placement} last-block W2 grad = O(L^{pred:g})",
        setting,
        placement,
        f"slope <= {pred:g} (upper bound; {T1_LEVEL:.0%} interval)",
        measured,
        agreement,
    )
    return check, {"depths": np.asarray(depths), "w2": w2, "predicted": curve, "slope": fit.slope}


def residual_gradient(
    setting: str, stack: str, placement: str, grads: np.ndarray, sublayers: int
) -> tuple[Check, dict]:
    """ResiDual's gradient statements on per-block gradient norms grads (seeds, N).

    Post-LN: the paper's curve C (1/2)^(m/2) e^sqrt(m), m = s (N - 1 - k) sublayers from the
    output, over the same blocks, C fitted (least squares in log). Agreement "yes" when the
    curve's own geometric rate over these blocks (`theory.postln_curve_rate`) lies in the
    bootstrap interval of the measured rate, or the two rates differ by less than a factor 2
    accumulated over the N - 1 block steps; otherwise "no", saying whether the measurement
    vanishes slower or faster than the curve, or not at all.
    Other placements (ResiDual, Pre-LN): bounded below, min/max block norm >= VANISHING_RATIO (the
    smallest block gets at least the share under which gradients are called vanishing).
    """
    fit = geometric_decay(grads)
    n = grads.shape[1]
    mean = np.exp(np.log(grads).mean(0))
    if placement == "post-ln":
        shape = theory.postln_gradient_curve(n, sublayers)
        log_c = float(np.mean(np.log(mean) - np.log(shape)))
        curve = np.exp(log_c) * shape
        curve_rate = theory.postln_curve_rate(n, sublayers)
        resid = float(np.sqrt(np.mean((np.log10(mean) - np.log10(curve)) ** 2)))
        measured = (
            f"{fit.rate:.3g} [{fit.low:.3g}, {fit.high:.3g}] per block; block 0/last {fit.first_over_last:.2g} "
            f"(curve {shape[0] / shape[-1]:.2g}); fitted curve off by {resid:.2g} decades (RMS)"
        )
        # within the bootstrap interval, or within a factor 2 accumulated over the whole stack
        # (a 3-seed bootstrap interval can be narrower than the seeds' real spread)
        if fit.low <= curve_rate <= fit.high or abs(math.log(fit.rate / curve_rate)) * (
            n - 1
        ) <= math.log(2):
            agree = "yes"
        elif fit.high < 1:
            agree = f"no: vanishes {'slower' if fit.rate > curve_rate else 'faster'} than the paper's curve"
        else:
            agree = "no: does not vanish"
        check = Check(
            "ResiDual: Post-LN gradient follows (1/2)^(m/2) e^sqrt(m) toward the input",
            setting + "/" + stack,
            placement,
            f"{curve_rate:.3g} per block over these {n} blocks (asymptote "
            f"{theory.postln_gradient_rate_per_block(sublayers):.3g})",
            measured,
            agree,
        )
    else:
        ratio = float(mean.min() / mean.max())
        curve = theory.residual_gradient_floor(np.arange(n), mean.min())
        check = Check(
            f"ResiDual: {placement} per-block gradient bounded below",
            setting + "/" + stack,
            placement,
            f"min/max block norm >= {VANISHING_RATIO:g}",
            f"min/max {ratio:.3g}; rate {fit.rate:.3g} per block",
            "yes" if ratio >= VANISHING_RATIO else "no",
        )
    return check, {"grads": grads, "predicted": curve, "fit": fit}


def collapse_toy_rtol(d: int, tokens: int) -> float:
    """Tolerance of the toy model's Monte-Carlo against its closed form: 4 standard errors of a mean
    of |N(0,1) - N(0,1)|-like terms over d * tokens samples (sd sqrt(pi/2 - 1)), plus the O(1/d)
    bias of LayerNorm's finite-width variance."""
    return 4 * math.sqrt(math.pi / 2 - 1) / math.sqrt(d * tokens) + 2 / d


def collapse_toy(
    placement: str, measured: dict[str, np.ndarray], predicted: dict[str, np.ndarray], rtol: float
) -> Check:
    """Monte-Carlo of the toy model against the closed forms: max relative error over blocks."""
    err = max(float(np.max(np.abs(measured[m] / predicted[m] - 1))) for m in measured)
    shape = {
        "pre-ln": "cos -> 1, ln_update ~ sqrt(2/(pi k))",
        "post-ln": "constant in k",
        "residual": "constant in k (x stream)",
    }[placement]
    return Check(
        "ResiDual collapse (toy, Gaussian updates): closed forms",
        "monte-carlo",
        placement,
        shape,
        f"max rel. error {err:.2%} (tolerance {rtol:.2%})",
        "yes" if err <= rtol else "no",
    )


def collapse_model(
    setting: str, placement: str, ln_update: np.ndarray, relative_update: np.ndarray
) -> list[Check]:
    """The collapse result on a real model at init; ln_update and relative_update (seeds, N).

    (1) The paper's shape: log-log slope of ln_update in k over k >= 2 (block 1 starts from the
    embedding), predicted -1/2 for Pre-LN (O(1/sqrt k)) and 0 for Post-LN and ResiDual's x
    stream, within SHAPE_SLOPE_TOL. (2) Pre-LN only: the closed form evaluated with this model's own
    update sizes (`theory.collapse_from_relative_update` of the measured relative_update): its
    slope against the measured one, within COLLAPSE_SLOPE_TOL; its per-block error is reported
    beside (relative_update is a token mean of ratios, which by Jensen runs a few % below the
    RMS ratio the closed form assumes). Where (1) disagrees and (2) agrees, the disagreement is the model's variances (a large embedding variance v1, updates
    whose size changes with k), not the closed form. (Post-LN's x stream lies on the LN sphere,
    where ln_update follows from relative_update by geometry alone: no row for it.)
    """
    k = np.arange(1, ln_update.shape[1] + 1)
    fit = loglog_slope(k[1:], ln_update[:, 1:])
    pred = -0.5 if placement == "pre-ln" else 0.0
    rows = [
        Check(
            "ResiDual collapse on the model: ln_update ~ k^slope",
            setting,
            placement,
            f"slope {pred:g}",
            f"slope {fit.slope:.3f} +- {fit.stderr:.3f}",
            "yes" if abs(fit.slope - pred) <= SHAPE_SLOPE_TOL else "no",
        )
    ]
    if placement == "pre-ln":
        closed = theory.collapse_from_relative_update(relative_update.mean(0))["ln_update"]
        err = float(np.max(np.abs(ln_update.mean(0)[1:] / closed[1:] - 1)))
        closed_slope = theory.loglog_slope_of(k[1:], closed[1:])
        rows.append(
            Check(
                "ResiDual collapse closed form with the model's own update sizes r_k",
                setting,
                placement,
                f"sqrt(2/pi) sqrt(2 (1 - 1/sqrt(1 + r_k^2))): slope {closed_slope:.3f} (+-{COLLAPSE_SLOPE_TOL})",
                f"slope {fit.slope:.3f}; ln_update within {err:.0%} of it per block (k >= 2)",
                "yes" if abs(fit.slope - closed_slope) <= COLLAPSE_SLOPE_TOL else "no",
            )
        )
    return rows


def adam(
    setting: str,
    rms: np.ndarray,
    absmax: np.ndarray,
    sizes: np.ndarray,
    kappa: np.ndarray,
    alpha: float,
    eps: float,
) -> Check:
    """ResiDual's Adam argument on a model: per block, its gradient RMS and largest |g_i|, parameter
    count n and the measured kappa (finite difference of torch Adam's update norm in the
    gradient's scale).

    Predicted kappa = alpha sqrt(n) / eps (`theory.residual_adam_condition`) where the gradient has
    vanished; agreement when every block with rms(g) < ADAM_REGIME * eps (there must be one) is
    within ADAM_RTOL of it; the block with the smallest gradient and the healthy blocks' kappa
    (rms > 100 eps) are reported beside.
    """
    paper = theory.residual_adam_condition(alpha, sizes, eps)
    ratio = kappa / paper
    vanished = rms < ADAM_REGIME * eps
    healthy = rms > 100 * eps
    example = float(theory.residual_adam_condition(1e-4, 1024, 1e-6))
    i = int(np.argmin(rms))
    if not vanished.any():
        measured = (
            f"no block has rms(g) < eps/1000; the smallest, rms {rms[i]:.2g} (max |g_i| {absmax[i]:.2g}), "
            f"has kappa / (alpha sqrt(n)/eps) = {ratio[i]:.3g}"
        )
        agree = "no: no block in the vanishing regime"
    else:
        r = ratio[vanished]
        measured = (
            f"{int(vanished.sum())}/{len(rms)} blocks with rms(g) < eps/1000: kappa / (alpha sqrt(n)/eps) = "
            f"{r.min():.4g}..{r.max():.4g}"
        )
        agree = "yes" if np.all(np.abs(r - 1) <= ADAM_RTOL) else "no"
    if healthy.any():
        measured += (
            f"; {int(healthy.sum())} blocks with rms > 100 eps: at most {ratio[healthy].max():.2g}"
        )
    return Check(
        "ResiDual: Adam's update condition number at vanishing gradient ~ alpha sqrt(d)/eps",
        setting,
        "post-ln",
        f"alpha sqrt(n)/eps, alpha {alpha:g} (learning rate), eps {eps:g} (paper's example {example:.0f})",
        measured,
        agree,
    )
