"""Fits that turn per-layer measurements into a rate, a slope or a constant, with their uncertainty.

- `geometric_decay`: per-block factor r of gradient norms, log g_k = a + k log r, with a
  bootstrap interval over seeds (`scipy.stats.bootstrap`);
- `loglog_slope`: slope of log y against log x with its standard error (`scipy.stats.linregress`;
  Xiong's W2 gradient against depth, the collapse shape in k);
- `line_fit`: a straight line with R^2 (Lemma 2's linear norm growth);
- `power_law_scale`: the constant c of y = c x^p for a known exponent p (`scipy.optimize.curve_fit`
  in log space): what a theory statement that fixes only a shape leaves to be fitted.

These run on exported records, never inside hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .curves import first_over_last


class FitError(UserError):
    """Too little or unusable data for a fit; one line for the user."""


@dataclass(frozen=True)
class DecayFit:
    rate: float  # per-block factor toward the input, g_{k-1} / g_k on the fitted line (< 1: vanishing)
    low: float  # bootstrap percentile interval of r over seeds (equal to rate with one seed)
    high: float
    intercept: (
        float  # log g at layer 0 on the fitted line (natural log): g_k = exp(intercept) * rate^-k
    )
    first_over_last: float  # geometric mean over seeds of g_0 / g_{N-1}
    seeds: int


def _positive_logs(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise FitError(
            "gradient norms must be finite and positive to fit a decay rate "
            f"({int(np.sum(~np.isfinite(v)))} non-finite, {int(np.sum(v <= 0))} non-positive)"
        )
    return np.log(v)


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of y (..., n) on x (n,)."""
    xc = x - x.mean()
    return (y - y.mean(-1, keepdims=True)) @ xc / (xc @ xc)


def geometric_decay(
    values, layers=None, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> DecayFit:
    """Fit g_k = exp(a) * r^-k to per-layer norms `values` of shape (seeds, layers) or (layers,).

    r is the factor per block toward the input (Post-LN's vanishing gives r < 1; the ResiDual
    paper's Post-LN curve has 0.434 per block over 48 blocks of 3 sublayers: theory.postln_curve_rate).
    The per-layer log norm
    is averaged over seeds (a geometric mean), then a least-squares line in k gives -log r.
    The slope is linear in the data, so it equals the mean of the seeds' own slopes, and its
    interval is `scipy.stats.bootstrap` of that mean over seeds (`n_boot` resamples, percentile
    method, `level`); with one seed, or seeds with equal slopes, it collapses to r.
    """
    from scipy import stats

    logs = _positive_logs(values)
    logs = logs[None, :] if logs.ndim == 1 else logs
    n_seeds, n_layers = logs.shape
    if n_layers < 2:
        raise FitError(f"a decay rate needs at least 2 layers, got {n_layers}")
    k = (
        np.arange(n_layers, dtype=np.float64)
        if layers is None
        else np.asarray(layers, dtype=np.float64)
    )
    per_seed = _slopes(k, logs)  # (seeds,)
    slope = float(per_seed.mean())
    intercept = float(logs.mean() - slope * k.mean())
    rate = math.exp(-slope)
    low = high = rate
    if n_seeds > 1 and np.ptp(per_seed) > 0:
        ci = stats.bootstrap(
            (per_seed,),
            np.mean,
            n_resamples=n_boot,
            confidence_level=level,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        low, high = math.exp(-ci.high), math.exp(-ci.low)
    return DecayFit(rate, low, high, intercept, first_over_last(np.exp(logs)), n_seeds)


@dataclass(frozen=True)
class SlopeFit:
    slope: float
    intercept: float  # log y at log x = 0 (natural logs)
    stderr: float  # standard error of the slope (nan with 2 points)
    n: int = 0  # points in the fit (seeds x x values)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The slope's two-sided `level` interval, Student t with n - 2 degrees of freedom
        (nan with 2 points)."""
        from scipy import stats

        if self.n <= 2 or not math.isfinite(self.stderr):
            return math.nan, math.nan
        half = float(stats.t.ppf((1 + level) / 2, self.n - 2)) * self.stderr
        return self.slope - half, self.slope + half


def loglog_slope(x, y) -> SlopeFit:
    """Least-squares slope of log y against log x (both positive); y may be (seeds, len(x)):
    each seed's points enter the fit, so the standard error reflects seed spread too."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    ly = _positive_logs(y)
    if not np.all(x > 0) or len(np.unique(x)) < 2:
        raise FitError("a log-log slope needs at least 2 distinct positive x values")
    lx = np.broadcast_to(np.log(x), ly.shape).ravel()
    ly = ly.ravel()
    fit = stats.linregress(lx, ly)
    stderr = float(fit.stderr) if len(lx) > 2 else math.nan
    return SlopeFit(float(fit.slope), float(fit.intercept), stderr, len(lx))


@dataclass(frozen=True)
class LineFit:
    slope: float
    intercept: float
    r2: float  # coefficient of determination


def line_fit(x, y) -> LineFit:
    """Least-squares line y = intercept + slope x (`scipy.stats.linregress`) and its R^2."""
    from scipy import stats

    fit = stats.linregress(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return LineFit(float(fit.slope), float(fit.intercept), float(fit.rvalue**2))


def power_law_scale(x, y, exponent: float) -> float:
    """The constant c of y = c x^exponent with the exponent held at its predicted value.

    Fitted by `scipy.optimize.curve_fit` on log y = log c + exponent log x, all seeds' points
    at once (y may be (seeds, len(x))): the least-squares log c is the mean of log(y / x^p),
    i.e. c is their geometric mean.
    """
    from scipy.optimize import curve_fit

    x = np.asarray(x, dtype=np.float64)
    ly = _positive_logs(y)
    lx = np.broadcast_to(np.log(x), ly.shape).ravel()
    (log_c,), _ = curve_fit(lambda lx_, log_c: log_c + exponent * lx_, lx, ly.ravel(), p0=[0.0])
    return float(math.exp(log_c))
