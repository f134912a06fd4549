"""The rules that choose a study's regime from its baselines, before the method is looked at.

A comparison of a new placement means something only in a regime where the field's known facts
hold: a 6-layer Post-LN Transformer with warm-up trains about as well as Pre-LN (the ResiDual
paper: 35.37 vs 35.12 BLEU), and training has levelled off. These rules read only the Post-LN and
Pre-LN calibration runs; the method's runs never enter them.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

GATE_BLEU = 5.0  # Post-LN E6D6 with warm-up must land within this many BLEU of Pre-LN
CONVERGED_REL = 0.01  # levelled off: held-out loss improves by less than 1 % ...
CONVERGED_TAIL = 0.2  # ... over the last 20 % of the steps


CONVERGED_WINDOW = 5  # each end of the tail is the mean of this many evaluations


def tail_improvement(
    curve: Sequence[Mapping], tail: float = CONVERGED_TAIL, window: int = CONVERGED_WINDOW
) -> float:
    """Relative held-out loss improvement over the last `tail` of the steps, (L(s0) - L(S)) / L(s0),
    s0 the last evaluation at or before (1 - tail) S, each L the mean of the `window` evaluations
    ending there. The means matter: with single evaluations a rule checked as training goes
    holds first on an upward blip of the loss, so a run stopped by it ends on its worst point
    (issue 34's first rule-stopped runs did: 0.453 after 0.384, 0.398 after 0.342). NaN if not
    computable."""
    rows = [r for r in curve if math.isfinite(float(r["heldout_loss"]))]
    if len(rows) < 2:
        return math.nan
    last = rows[-1]["step"]
    i = max((k for k, r in enumerate(rows) if r["step"] <= (1 - tail) * last), default=None)
    if i is None:
        return math.nan

    def level(end: int) -> float:
        return sum(float(r["heldout_loss"]) for r in rows[max(0, end - window + 1) : end + 1]) / (
            end + 1 - max(0, end - window + 1)
        )

    a, b = level(i), level(len(rows) - 1)
    return (a - b) / a


def converged(curve: Sequence[Mapping]) -> bool:
    """The convergence rule: held-out loss improved by less than CONVERGED_REL over the last
    CONVERGED_TAIL of the steps (window means, `tail_improvement`)."""
    return tail_improvement(curve) < CONVERGED_REL


def gate_passes(post_bleu: float, pre_bleu: float) -> bool:
    """The sanity gate: Post-LN (with warm-up) within GATE_BLEU of Pre-LN (or above it)."""
    return (
        math.isfinite(post_bleu) and math.isfinite(pre_bleu) and pre_bleu - post_bleu <= GATE_BLEU
    )


def choose_lr(calibration: Mapping[float, Mapping[str, float]]) -> tuple[float, str]:
    """The main peak learning rate from the baselines' calibration runs: {lr: {"post-ln": BLEU, "pre-ln": BLEU}}.

    Rule: the largest lr at which the gate passes (the paper's claim is about stability at high
    lr, so the highest lr where the baselines still behave as in the paper); if none passes, the lr
    with the smallest Pre-LN - Post-LN gap. Returns (lr, the rule's text with the numbers).
    """
    gaps = {lr: c["pre-ln"] - c["post-ln"] for lr, c in calibration.items()}
    passing = [lr for lr, c in calibration.items() if gate_passes(c["post-ln"], c["pre-ln"])]
    if passing:
        lr = max(passing)
        why = f"largest lr with Post-LN within {GATE_BLEU:g} BLEU of Pre-LN"
    else:
        lr = min(gaps, key=lambda k: gaps[k] if math.isfinite(gaps[k]) else math.inf)
        why = "no lr passes the gate; the smallest Pre-LN - Post-LN gap"
    detail = ", ".join(
        f"lr {k:g}: Post-LN {c['post-ln']:.2f} / Pre-LN {c['pre-ln']:.2f}"
        for k, c in sorted(calibration.items())
    )
    return lr, f"{why} ({detail}; BLEU, warm-up, seed 0)"


ASYMPTOTE_TAIL = 0.5  # the fit reads the second half of a run's points


class Asymptote(NamedTuple):
    """A fitted level a of v(t) = a - b exp(-t / tau) (`asymptote`), and what says whether the
    data determine it."""

    level: float
    se: float  # its standard error, from the fit's covariance
    tau: float
    span: float  # the steps the fitted points cover
    upper: float  # the bound the level was fitted under

    @property
    def identified(self) -> bool:
        """The level is read from the data, not set by the curve's form: a finite standard error,
        not pinned at its bound, and tau no longer than the fitted span (the curve bends inside the
        data; with a longer tau the points are a straight line, and any level past them fits)."""
        return not self.why_not()

    def why_not(self) -> str:
        """Why the level is not identified ("" when it is)."""
        if not math.isfinite(self.se):
            return "no finite standard error"
        if self.level >= self.upper - 0.01:
            return f"level at its bound {self.upper:g}"
        if self.tau > self.span:
            return f"tau {self.tau:.0f} steps > the {self.span:.0f} fitted"
        return ""


def asymptote(
    steps: Sequence[float],
    values: Sequence[float],
    tail: float = ASYMPTOTE_TAIL,
    upper: float = math.inf,
) -> Asymptote | None:
    """Where a run that hit its cap was heading: a least-squares fit of v(t) = a - b exp(-t / tau)
    to its points in the last `tail` of its steps (scipy's curve_fit), or None when there are
    fewer than 4 points or the fit fails. A saturating exponential is the simplest curve with a
    level; its a is an extrapolation, reported as one, and decides nothing unless `identified`.
    Only the late points: BLEU rises fast, then creeps, and a fit that also reads the fast rise
    (from step 1000) put Pre-LN E12D12 seed 0's level at 88.4, under its own last points
    (89.1-89.9). `upper`: the largest level the quantity can have (BLEU: 100)."""
    import numpy as np
    from scipy.optimize import curve_fit

    t = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    keep = (t >= (1 - tail) * t.max()) & np.isfinite(v)
    t, v = t[keep], v[keep]
    if len(t) < 4:
        return None

    def curve(x, a, b, tau):
        return a - b * np.exp(-x / tau)

    span = float(t.max())
    try:
        (a, b, tau), cov = curve_fit(
            curve,
            t,
            v,
            p0=(v[-1], max(v[-1] - v[0], 1e-3) * math.exp(t[0] / span), span),
            bounds=((-np.inf, -np.inf, 100.0), (upper, np.inf, 100.0 * span)),
            maxfev=20000,
        )
    except (RuntimeError, ValueError):
        return None
    se = float(np.sqrt(cov[0, 0])) if np.isfinite(cov[0, 0]) else math.inf
    return Asymptote(float(a), se, float(tau), float(t.max() - t.min()), float(upper))
