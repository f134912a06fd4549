"""Loss curves of training runs: training loss (smoothed) and held-out loss per run.

Draws the table of `analysis.curves.loss_curves` (run, step, train_loss, train_ema, val_loss).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Collection, Mapping

import numpy as np
import pandas as pd

from .style import color, save, setup


def plot_losses(
    curves: pd.DataFrame,
    path_stem: str | Path,
    placements: Mapping[str, str],
    dashed: Collection[str] = (),
    formats=("png",),
    title: str = "",
) -> list[Path]:
    """One line per run, coloured by its placement (run label -> placement); runs in `dashed`
    (a study's runs without warm-up) are drawn dashed."""
    plt = setup()
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    top = 0.0
    for name, d in curves.groupby("run", sort=False):
        placement = placements[name]
        style = "--" if name in dashed else "-"
        if len(d):
            ax_t.plot(d["step"], d["train_ema"], style, color=color(placement), label=name, lw=1.4)
            finite = d["train_loss"][np.isfinite(d["train_loss"])]
            top = max(top, float(finite[:5].max()) if len(finite) else 0.0)
            if not math.isfinite(d["train_loss"].iloc[-1]):  # diverged: mark where
                ax_t.plot(d["step"].iloc[-1], top, "x", color=color(placement), ms=9)
        v = d.dropna(subset=["val_loss"])
        if len(v):
            ax_v.plot(
                v["step"],
                v["val_loss"],
                style + "o",
                color=color(placement),
                label=name,
                lw=1.4,
                ms=3,
            )
    for ax, what in ((ax_t, "training loss (EMA 0.9)"), (ax_v, "held-out loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{what} [nats/byte]")
        if top:
            ax.set_ylim(top=top * 1.05)
    ax_t.set_title(title or "training")
    ax_v.set_title("held-out (last 5% of the corpus)")
    if ax_v.get_legend_handles_labels()[
        0
    ]:  # no held-out point yet (a run that stopped early): no legend
        ax_v.legend(frameon=False, fontsize=8)
    else:
        ax_v.text(
            0.5,
            0.5,
            "no held-out evaluation yet",
            transform=ax_v.transAxes,
            ha="center",
            color="0.4",
        )
    fig.tight_layout()
    return save(fig, path_stem, formats)
