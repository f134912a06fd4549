"""Fits that turn per-layer measurements into a rate, a slope and a sentence.

- `geometric_decay`: per-block factor r of gradient norms, log g_k = a + k log r, with a
  bootstrap interval over seeds;
- `loglog_slope`: slope of log y against log x (Xiong's W2 gradient against depth);
- `verdict`: a plain-language diagnosis of one placement's per-layer gradient profile;
- `gradient_theory_overlay`: the predicted per-layer curves and verdicts for a grad-norms table.

numpy only: these run on exported records, never inside hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import theory


class FitError(ValueError):
    """Too little or unusable data for a fit; one line for the user."""


@dataclass(frozen=True)
class DecayFit:
    rate: float  # per-block factor toward the input, g_{k-1} / g_k on the fitted line (< 1: vanishing)
    low: float  # bootstrap percentile interval of r over seeds (equal to rate with one seed)
    high: float
    intercept: float  # log g at layer 0 on the fitted line (natural log): g_k = exp(intercept) * rate^-k
    first_over_last: float  # geometric mean over seeds of g_0 / g_{N-1}
    seeds: int


def _positive_logs(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise FitError("gradient norms must be finite and positive to fit a decay rate "
                       f"({int(np.sum(~np.isfinite(v)))} non-finite, {int(np.sum(v <= 0))} non-positive)")
    return np.log(v)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y on x; y may be (..., n) for many fits at once."""
    xc = x - x.mean()
    slope = (y - y.mean(-1, keepdims=True)) @ xc / (xc @ xc)
    return slope, y.mean(-1) - slope * x.mean()


def geometric_decay(values, layers=None, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> DecayFit:
    """Fit g_k = exp(a) * r^-k to per-layer norms `values` of shape (seeds, layers) or (layers,).

    r is the factor per block toward the input (Post-LN's vanishing gives r < 1; the ResiDual
    paper's Post-LN curve has 0.434 per block over 48 blocks of 3 sublayers: theory.postln_curve_rate). The per-layer log norm
    is averaged over seeds (a geometric mean), then a least-squares line in k gives -log r. The interval resamples seeds with replacement (`n_boot` times) and reports
    the `level` percentile interval of r; with one seed it collapses to r.
    """
    logs = _positive_logs(values)
    logs = logs[None, :] if logs.ndim == 1 else logs
    n_seeds, n_layers = logs.shape
    if n_layers < 2:
        raise FitError(f"a decay rate needs at least 2 layers, got {n_layers}")
    k = np.arange(n_layers, dtype=np.float64) if layers is None else np.asarray(layers, dtype=np.float64)
    slope, intercept = _line(k, logs.mean(0))
    low = high = float(np.exp(-slope))
    if n_seeds > 1:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
        boot, _ = _line(k, logs[picks].mean(1))  # (n_boot,)
        q = (1 - level) / 2
        low, high = (float(v) for v in np.exp(-np.quantile(boot, [1 - q, q])))
    ratio = float(np.exp(np.mean(logs[:, 0] - logs[:, -1])))
    return DecayFit(float(np.exp(-slope)), low, high, float(intercept), ratio, n_seeds)


@dataclass(frozen=True)
class SlopeFit:
    slope: float
    intercept: float  # log y at log x = 0 (natural logs)
    stderr: float  # standard error of the slope (nan with 2 points)


def loglog_slope(x, y) -> SlopeFit:
    """Least-squares slope of log y against log x (both positive); y may be (seeds, len(x)):
    each seed's points enter the fit, so the standard error reflects seed spread too."""
    x = np.asarray(x, dtype=np.float64)
    ly = _positive_logs(y)
    lx = np.log(x) if np.all(x > 0) else None
    if lx is None or len(np.unique(x)) < 2:
        raise FitError("a log-log slope needs at least 2 distinct positive x values")
    lx = np.broadcast_to(lx, ly.shape).ravel()
    ly = ly.ravel()
    slope, intercept = _line(lx, ly)
    dof = len(lx) - 2
    resid = ly - (intercept + slope * lx)
    stderr = math.sqrt(resid @ resid / dof / np.sum((lx - lx.mean()) ** 2)) if dof > 0 else math.nan
    return SlopeFit(float(slope), float(intercept), stderr)


def verdict(fit: DecayFit, n_layers: int, factor: float = 10.0) -> str:
    """One sentence on a per-layer gradient profile: vanishing, growing, or balanced.

    `factor`: the first/last ratio beyond which the spread across blocks is named (10x).
    """
    last = n_layers - 1
    ratio = fit.first_over_last
    interval = f"{fit.rate:.3g} per block" + (f" [{fit.low:.3g}, {fit.high:.3g}]" if fit.seeds > 1 else "")
    if ratio < 1 / factor:
        return f"gradients vanish toward the input: block 0 gets {ratio:.2g} of block {last}'s norm, {interval}"
    if ratio > factor:
        return f"gradients grow toward the input: block 0 gets {ratio:.3g}x block {last}'s norm, {interval}"
    return f"balanced: block 0 gets {ratio:.3g}x block {last}'s norm, {interval}"


def gradient_theory_overlay(rows: list[dict], value: str = "param_grad_norm") -> tuple[list[dict], list[dict]]:
    """Predicted per-layer curves and verdicts for a grad-norms table (the `--theory` overlay).

    rows: dicts with placement, seed, step, stack, layer, sublayer, and `value` (grad_norms.csv);
    only sublayer == "block" rows are used. For each (placement, stack, step) returns
    - curves: {placement, stack, step, layer, predicted, fitted}: `fitted` the geometric fit;
      `predicted` the placement's own predicted profile (`theory.gradient_profile`: Post-LN the
      ResiDual paper's (1/2)^(m/2) e^sqrt(m), m in sublayers from the output; Pre-LN and ResiDual
      the identity path's flat floor), through the last block's measured norm; NaN (nothing
      drawn) for placements no source gives a curve for (DeepNorm, B2T, Sandwich, ...);
    - verdicts: {placement, stack, step, rate, low, high, first_over_last, predicted_rate,
      source, verdict}: predicted_rate is the profile's own geometric rate over the same blocks
      (NaN without a profile).
    """
    groups: dict[tuple, dict[int, dict[int, float]]] = {}
    sublayers: dict[tuple, set] = {}
    for r in rows:
        key = (r["placement"], r["stack"], int(r["step"]))
        if r["sublayer"] == "block":
            groups.setdefault(key, {}).setdefault(int(r["seed"]), {})[int(r["layer"])] = float(r[value])
        else:
            sublayers.setdefault(key, set()).add(r["sublayer"])
    curves, verdicts = [], []
    for key, by_seed in sorted(groups.items()):
        placement, stack, step = key
        layers = sorted(set.intersection(*(set(v) for v in by_seed.values())))
        table = np.array([[by_seed[s][k] for k in layers] for s in sorted(by_seed)])
        fit = geometric_decay(table, layers)
        n_sub = len(sublayers.get(key, ())) or (3 if stack == "decoder" else 2)
        last = float(np.exp(np.log(table[:, -1]).mean()))
        profile = theory.gradient_profile(placement)
        if profile is None:
            pred = np.full(len(layers), math.nan)
            pred_rate = math.nan
        else:
            pred = profile.curve(layers, n_sub, last)
            pred_rate = float(np.exp(-np.polyfit(np.asarray(layers, dtype=np.float64), np.log(pred), 1)[0])) \
                if len(layers) > 1 else math.nan
        for k, p in zip(layers, pred):
            curves.append({"placement": placement, "stack": stack, "step": step, "layer": k,
                           "predicted": float(p), "fitted": float(math.exp(fit.intercept) * fit.rate**-k)})
        verdicts.append({"placement": placement, "stack": stack, "step": step, "rate": fit.rate, "low": fit.low,
                         "high": fit.high, "first_over_last": fit.first_over_last, "predicted_rate": pred_rate,
                         "source": profile.source if profile else "", "verdict": verdict(fit, len(layers))})
    return curves, verdicts
