"""Figures of the all-placements study: a heatmap of the init gradient ratio (placements x depths)
and a three-panel summary of the short training runs (one row per placement). Nothing is
decided here: the thresholds drawn are analysis.verdicts'."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis.verdicts import VANISHING_RATIO
from .style import color, label, save, setup


def plot_init_ratios(df: pd.DataFrame, path_stem: str | Path, formats=("png",), title: str = ""):
    """df: placement, stack, depth, first_over_last. One heatmap per stack (placements x depths),
    cells coloured by log10 of the ratio and annotated with it."""
    import seaborn as sns

    plt = setup()
    order = list(dict.fromkeys(df["placement"]))
    stacks = [s for s in ("encoder", "decoder") if s in set(df["stack"])]
    ncol = len(stacks)
    fig, axes = plt.subplots(
        1,
        ncol,
        figsize=(1.1 * df["depth"].nunique() * ncol + 3.4, 0.36 * len(order) + 1.5),
        sharey=True,
        squeeze=False,
    )
    for j, (ax, stack) in enumerate(zip(axes[0], stacks)):
        sel = df[df["stack"] == stack]
        table = sel.pivot(index="placement", columns="depth", values="first_over_last").loc[order]
        table = table.astype(float)
        sns.heatmap(
            np.log10(table.where(table > 0)),
            ax=ax,
            cmap="RdBu",
            center=0,
            vmin=-4,
            vmax=4,
            annot=table.map(lambda v: f"{v:.2g}" if np.isfinite(v) else "nan"),
            fmt="",
            annot_kws={"fontsize": 7},
            cbar=j == ncol - 1,
            cbar_kws={"label": "log10 first/last block gradient norm"},
            linewidths=0.5,
        )
        ax.grid(False)
        ax.set_title(stack, fontsize=9)
        ax.set_xlabel("depth N (blocks per stack)")
        ax.set_ylabel("")
    axes[0, 0].set_yticklabels([label(p) for p in order], rotation=0, fontsize=8)
    fig.suptitle(
        f"{title}\nred: vanishing toward the input (< {VANISHING_RATIO:g}); blank: no gradient",
        fontsize=9,
    )
    fig.tight_layout()
    return save(fig, path_stem, formats)


def plot_training_summary(
    df: pd.DataFrame, path_stem: str | Path, formats=("png",), title: str = ""
):
    """df: placement, warmup, final_val_loss, grad_ratio_last_step, late_cos_adjacent (one row per
    run). Three panels sharing the placement axis; runs with warm-up drawn open."""
    plt = setup()
    order = list(dict.fromkeys(df["placement"]))
    y = {p: i for i, p in enumerate(order)}
    panels = (
        ("final_val_loss", "held-out loss (nats/byte)", False),
        ("grad_ratio_last_step", "first/last block gradient norm", True),
        ("late_cos_adjacent", "late blocks' adjacent cosine", False),
    )
    fig, axes = plt.subplots(
        1, 3, figsize=(11, 0.32 * len(order) + 1.5), sharey=True, squeeze=False
    )
    for ax, (column, xlabel, log) in zip(axes[0], panels):
        for _, r in df.iterrows():
            v = float(r[column])
            if not np.isfinite(v) or (log and v <= 0):
                ax.annotate(
                    "n/a",
                    (0.02, y[r["placement"]]),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    va="center",
                    color="0.4",
                )
                continue
            warm = int(r["warmup"]) > 0
            ax.plot(
                v,
                y[r["placement"]],
                "s" if warm else "o",
                mfc="none" if warm else color(r["placement"]),
                mec=color(r["placement"]),
                ms=6,
            )
        if log:
            ax.set_xscale("log")
            ax.axvline(VANISHING_RATIO, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.grid(axis="y", color="0.92")
    axes[0, 0].set_yticks(range(len(order)), [label(p) for p in order], fontsize=8)
    axes[0, 0].invert_yaxis()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path_stem, formats)
