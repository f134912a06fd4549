"""The curves the figures draw: summaries over seeds and steps, as tables.

Everything a plot shows that is not a raw measurement is computed here: the geometric mean
over seeds with the seeds' range, the first/last block gradient ratio, and EMA smoothing.
Inputs are tidy tables (pandas DataFrames or (seeds, layers) arrays); nothing here runs
inside hooks.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd


def geometric_mean(table, axis: int = 0) -> np.ndarray:
    """exp(mean(log x)) along `axis`; non-positive or non-finite entries are left out (nan if none is left)."""
    a = np.asarray(table, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", RuntimeWarning
        )  # an all-nan column: nan, said by the result
        logs = np.where((a > 0) & np.isfinite(a), np.log(np.where(a > 0, a, 1.0)), np.nan)
        return np.exp(np.nanmean(logs, axis=axis))


def band(table) -> dict[str, np.ndarray]:
    """A (seeds, n) table as a line and its spread: center (geometric mean over seeds), low, high (min, max)."""
    a = np.atleast_2d(np.asarray(table, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "center": geometric_mean(a),
            "low": np.nanmin(a, axis=0),
            "high": np.nanmax(a, axis=0),
            "seeds": a.shape[0],
        }


def seed_band(
    df: pd.DataFrame, by: list[str], x: str = "layer", value: str = "param_grad_norm"
) -> pd.DataFrame:
    """`band` per group of a tidy table: columns by..., x, center, low, high, seeds (one row per point)."""
    parts = []
    for key, g in df.groupby(by, sort=False):
        wide = g.pivot_table(index="seed", columns=x, values=value, aggfunc="first").sort_index(
            axis=1
        )
        b = band(wide.to_numpy())
        part = pd.DataFrame(
            {
                x: wide.columns.to_numpy(),
                "center": b["center"],
                "low": b["low"],
                "high": b["high"],
                "seeds": b["seeds"],
            }
        )
        for name, v in zip(by, key if isinstance(key, tuple) else (key,)):
            part.insert(0, name, v)
        parts.append(part)
    columns = [*by, x, "center", "low", "high", "seeds"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def first_over_last(norms) -> float:
    """Geometric mean over seeds of g_0 / g_{N-1}: the first block's gradient norm over the last's.

    norms: (seeds, layers) or (layers,), layers in block order. < 1: gradients vanish toward
    the input; > 1: they grow. A seed whose last norm is 0 gives nan.
    """
    a = np.atleast_2d(np.asarray(norms, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a[:, -1] > 0, a[:, 0] / a[:, -1], np.nan)
        return float(np.exp(np.mean(np.log(ratio))))


def profile_ratio(by_layer: dict[int, float]) -> float:
    """First block's value over the last block's, of one step's profile {block: value}; NaN where
    it is not defined (fewer than 2 blocks, a non-finite or non-positive end)."""
    values = [by_layer[k] for k in sorted(by_layer)]
    if len(values) < 2 or not all(math.isfinite(v) and v > 0 for v in (values[0], values[-1])):
        return math.nan
    return first_over_last(values)


def layer_table(df: pd.DataFrame, value: str = "param_grad_norm") -> np.ndarray:
    """(seeds, layers) array of one profile (the rows of one placement/stack/step), in sorted order."""
    return (
        df.pivot_table(index="seed", columns="layer", values=value, aggfunc="first", dropna=False)
        .sort_index(axis=1)
        .to_numpy()
    )


def ratio_by_step(
    df: pd.DataFrame, by: tuple[str, ...] = ("placement", "stack"), value: str = "param_grad_norm"
) -> pd.DataFrame:
    """`first_over_last` per (by..., step) from whole-block rows: columns by..., step, first_over_last, seeds."""
    block = df[df["sublayer"] == "block"] if "sublayer" in df else df
    keys = [*by, "step"]
    rows = []
    for key, g in block.groupby(keys, sort=True):
        table = layer_table(g, value)
        rows.append(
            {**dict(zip(keys, key)), "first_over_last": first_over_last(table), "seeds": len(table)}
        )
    return pd.DataFrame(rows, columns=[*keys, "first_over_last", "seeds"])


def ema(values, beta: float = 0.9) -> np.ndarray:
    """Exponential moving average m_i = beta m_{i-1} + (1 - beta) x_i, m_0 = x_0; a non-finite x_i
    restarts it (a diverged loss stays visible instead of being smoothed away)."""
    x = np.asarray(values, dtype=np.float64)
    out, m = np.empty_like(x), x[0] if len(x) else 0.0
    for i, v in enumerate(x):
        m = beta * m + (1 - beta) * v if math.isfinite(v) else v
        out[i] = m
    return out


def loss_curves(runs, beta: float = 0.9) -> pd.DataFrame:
    """The loss.csv of each run as one table: run, step, train_loss, train_ema (`ema` with `beta`),
    val_loss (nan where not evaluated). runs: {label: path of a loss.csv}, in drawing order."""
    parts = []
    for name, path in runs.items():
        d = pd.read_csv(path)
        parts.append(
            pd.DataFrame(
                {
                    "run": name,
                    "step": d["step"],
                    "train_loss": d["train_loss"].astype(float),
                    "train_ema": ema(d["train_loss"].to_numpy(dtype=np.float64), beta),
                    "val_loss": d["val_loss"].astype(float),
                }
            )
        )
    columns = ["run", "step", "train_loss", "train_ema", "val_loss"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)
