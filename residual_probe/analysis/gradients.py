"""Per-layer gradient profiles: the `--theory` overlay and its verdicts (`verdicts.decay_verdict`).

Inputs are tidy rows of gradient norms (`grad_norms.csv`: placement, seed, step, stack, layer,
sublayer, param_grad_norm); whole-block rows (sublayer "block") carry the profile.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import theory
from .curves import geometric_mean
from .fits import geometric_decay
from .verdicts import decay_verdict


def theory_overlay(
    rows, step: int | None = None, value: str = "param_grad_norm"
) -> tuple[list[dict], list[dict]]:
    """Predicted per-layer curves and verdicts for a grad-norms table (the `--theory` overlay).

    rows: dicts (or a DataFrame) with placement, seed, step, stack, layer, sublayer, `value`;
    only whole-block rows are fitted, the other sublayer names count the sublayers per block.
    `step`: only that step (default: every step). For each (placement, stack, step) returns
    - curves: {placement, stack, step, layer, predicted, fitted}: `fitted` the geometric fit;
      `predicted` the placement's own predicted profile (`theory.gradient_profile`: Post-LN the
      ResiDual paper's (1/2)^(m/2) e^sqrt(m), m in sublayers from the output; Pre-LN and ResiDual
      the identity path's flat floor), through the last block's measured norm; NaN (nothing
      drawn) for placements no source gives a curve for (DeepNorm, B2T, Sandwich, ...);
    - verdicts: {placement, stack, step, rate, low, high, first_over_last, predicted_rate,
      source, verdict}: predicted_rate is the profile's own geometric rate over the same blocks
      (NaN without a profile).
    A profile with a zero or non-finite block norm cannot be fitted on a log scale (ReZero at
    init has zero gradients in every block but its gate): its verdict says so, and it has no curve.
    """
    df = pd.DataFrame(rows)
    if step is not None:
        df = df[df["step"] == step]
    curves, verdicts = [], []
    for (placement, stack, s), g in df.groupby(["placement", "stack", "step"], sort=True):
        block = g[g["sublayer"] == "block"]
        if block.empty:
            continue
        key = {"placement": placement, "stack": stack, "step": int(s)}
        vals = block[value].to_numpy(dtype=np.float64)
        if not np.all((vals > 0) & np.isfinite(vals)):
            verdicts.append({**key, "verdict": "not fitted: a block has a zero or non-finite norm"})
            continue
        table = block.pivot_table(index="seed", columns="layer", values=value).dropna(axis=1)
        layers = [int(k) for k in table.columns]
        table = table.to_numpy()
        fit = geometric_decay(table, layers)
        n_sub = g.loc[g["sublayer"] != "block", "sublayer"].nunique() or (
            3 if stack == "decoder" else 2
        )
        last = float(geometric_mean(table[:, -1]))
        profile = theory.gradient_profile(placement)
        if profile is None:
            pred = np.full(len(layers), math.nan)
            pred_rate = math.nan
        else:
            pred = profile.curve(layers, n_sub, last)
            pred_rate = (
                float(np.exp(-np.polyfit(np.asarray(layers, dtype=np.float64), np.log(pred), 1)[0]))
                if len(layers) > 1
                else math.nan
            )
        for k, p in zip(layers, pred):
            curves.append(
                {
                    **key,
                    "layer": k,
                    "predicted": float(p),
                    "fitted": float(math.exp(fit.intercept) * fit.rate**-k),
                }
            )
        verdicts.append(
            {
                **key,
                "rate": fit.rate,
                "low": fit.low,
                "high": fit.high,
                "first_over_last": fit.first_over_last,
                "predicted_rate": pred_rate,
                "source": profile.source if profile else "",
                "verdict": decay_verdict(fit, len(layers)),
            }
        )
    return curves, verdicts
