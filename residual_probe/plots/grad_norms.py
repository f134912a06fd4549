"""Figure of per-block gradient norms: layer on x, norm on a log y axis, one line per placement.

The analogue of the ResiDual paper's Fig. 2(a). One panel per stack (encoder, decoder); the
line is the geometric mean over seeds, the band the seeds' min-max (both from
`analysis.curves.seed_band`). With training steps, a second row shows the first-to-last
block ratio over steps (`analysis.curves.ratio_by_step`). Nothing is computed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
from matplotlib.ticker import MaxNLocator

from .style import color, label, save, setup


def _stacks(df: pd.DataFrame) -> list[str]:
    found = list(dict.fromkeys(df["stack"]))
    return [s for s in ("encoder", "decoder") if s in found] + sorted(
        set(found) - {"encoder", "decoder"}
    )


def draw_layer_profile(
    ax, band: pd.DataFrame, placements: Sequence[str], curves: pd.DataFrame | None = None
) -> None:
    """One stack's per-block gradient norm: band rows (placement, layer, center, low, high, seeds);
    curves (placement, layer, predicted, fitted), when given, dashed and dotted."""
    n = 0
    for p in placements:
        b = band[band["placement"] == p].sort_values("layer")
        if b.empty:
            continue
        n = max(n, len(b))
        ax.plot(b["layer"], b["center"], color=color(p), label=label(p), lw=1.6)
        if b["seeds"].max() > 1:
            ax.fill_between(b["layer"], b["low"], b["high"], color=color(p), alpha=0.2, lw=0)
        if curves is not None and len(curves):
            c = curves[curves["placement"] == p].sort_values("layer")
            ax.plot(c["layer"], c["predicted"], "--", color=color(p), lw=1.0, alpha=0.9)
            ax.plot(c["layer"], c["fitted"], ":", color=color(p), lw=1.0, alpha=0.9)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"block k (0 = input side, {n - 1} = output side)")
    ax.set_ylabel(r"$\|\partial L/\partial\theta_k\|_2$")


SMALL_MULTIPLES = 6  # more placements than this: one panel each, not one line each on one axis
REFERENCES = ("post-ln", "pre-ln")  # drawn in grey behind every small multiple
STACK_LINES = {"encoder": "--", "decoder": "-"}


def plot_grad_norm_grid(
    band: pd.DataFrame, path_stem: str | Path, formats=("png",), steps: int = 0, title: str = ""
) -> list[Path]:
    """Small multiples for many placements: a panel per placement on one shared log y axis, its
    stacks in its colour (decoder solid, encoder dashed), Post-LN and Pre-LN in grey behind."""
    plt = setup()
    placements = list(dict.fromkeys(band["placement"]))
    stacks = _stacks(band)
    ncols = min(6, len(placements))
    nrows = -(-len(placements) // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(2.5 * ncols, 2.2 * nrows + 0.6),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for ax, p in zip(axes.flat, placements):
        for ref in REFERENCES:
            for stack in stacks:
                r = band[(band["placement"] == ref) & (band["stack"] == stack)]
                if ref != p and len(r):
                    r = r.sort_values("layer")
                    ax.plot(r["layer"], r["center"], STACK_LINES.get(stack, "-"), color="0.8", lw=1)
        for stack in stacks:
            b = band[(band["placement"] == p) & (band["stack"] == stack)].sort_values("layer")
            ax.plot(b["layer"], b["center"], STACK_LINES.get(stack, "-"), color=color(p), lw=1.6)
            if len(b) and b["seeds"].max() > 1:
                ax.fill_between(b["layer"], b["low"], b["high"], color=color(p), alpha=0.25, lw=0)
        ax.set_title(label(p), fontsize=9)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    for ax in axes.flat[len(placements) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("block k")
    for ax in axes[:, 0]:
        ax.set_ylabel(r"$\|\partial L/\partial\theta_k\|_2$")
    when = "at initialization" if steps == 0 else f"after {steps} Adam steps"
    how = "; ".join(f"{s} {'dashed' if STACK_LINES.get(s) == '--' else 'solid'}" for s in stacks)
    head = f"per-block gradient norm {when} ({how}; grey: Post-LN and Pre-LN)"
    fig.suptitle(f"{title}\n{head}" if title else head, fontsize=10)
    fig.tight_layout()
    return save(fig, path_stem, formats)


def plot_grad_norms(
    band: pd.DataFrame,
    path_stem: str | Path,
    formats=("png",),
    steps: int = 0,
    ratios: pd.DataFrame | None = None,
    curves: pd.DataFrame | None = None,
    title: str = "",
) -> list[Path]:
    """band: per-block seed bands at the last step (placement, stack, layer, center, low, high, seeds);
    ratios (placement, stack, step, first_over_last): the second row when steps > 0;
    curves (placement, stack, layer, predicted, fitted): the theory overlay."""
    placements = list(dict.fromkeys(band["placement"]))
    if len(placements) > SMALL_MULTIPLES:  # the first/last ratios over steps: in the JSON summary
        return plot_grad_norm_grid(band, path_stem, formats, steps, title)
    plt = setup()
    stacks = _stacks(band)
    nrows = 2 if steps > 0 and ratios is not None else 1
    fig, axes = plt.subplots(
        nrows, len(stacks), figsize=(max(6.4, 4.6 * len(stacks)), 3.6 * nrows), squeeze=False
    )
    for j, stack in enumerate(stacks):
        ax = axes[0, j]
        sel = curves[curves["stack"] == stack] if curves is not None and len(curves) else None
        draw_layer_profile(ax, band[band["stack"] == stack], placements, sel)
        when = "at initialization" if steps == 0 else f"after {steps} Adam steps"
        ax.set_title(f"{stack}: per-block gradient norm {when}")
        ax.legend(loc="best", frameon=False)
        if nrows == 2:
            ax = axes[1, j]
            for p in placements:
                r = ratios[(ratios["stack"] == stack) & (ratios["placement"] == p)].sort_values(
                    "step"
                )
                ax.plot(r["step"], r["first_over_last"], color=color(p), label=label(p), lw=1.6)
            ax.axhline(1.0, color="black", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("Adam step")
            ax.set_ylabel("first block / last block grad norm")
            ax.set_title(f"{stack}: vanishing toward the input over training")
            ax.legend(loc="best", frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path_stem, formats)


def plot_depth_grid(
    panels: dict[tuple[str, int], pd.DataFrame],
    path_stem: str | Path,
    formats=("png",),
    title: str = "",
) -> list[Path]:
    """Rows: settings (e.g. "seq2seq decoder"); columns: depths. `panels[(setting, depth)]` = a seed-band table."""
    plt = setup()
    settings = list(dict.fromkeys(s for s, _ in panels))
    depths = sorted({d for _, d in panels})
    fig, axes = plt.subplots(
        len(settings), len(depths), figsize=(3.3 * len(depths), 2.9 * len(settings)), squeeze=False
    )
    for i, setting in enumerate(settings):
        for j, depth in enumerate(depths):
            ax = axes[i, j]
            band = panels.get((setting, depth))
            if band is not None:
                draw_layer_profile(ax, band, list(dict.fromkeys(band["placement"])))
            ax.set_title(f"{setting}, N = {depth}")
            if j:
                ax.set_ylabel("")
            if i == 0 and j == 0:
                ax.legend(loc="best", frameon=False, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path_stem, formats)
