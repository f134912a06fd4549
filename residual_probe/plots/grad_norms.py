"""Figure of per-block gradient norms: layer on x, norm on a log y axis, one line per placement.

The analogue of the ResiDual paper's Fig. 2(a). One panel per stack (encoder, decoder); the
line is the geometric mean over seeds, the band the seeds' min-max. With training steps, a
second row shows how the first-to-last block ratio evolves over steps.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

from .style import color, label, save, setup


def _by(rows, key: Callable):
    out = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return out


def _layer_matrix(rows, value="param_grad_norm"):
    """(seeds, layers) array of values from rows of one placement/stack/step."""
    seeds = sorted({r["seed"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    m = np.full((len(seeds), len(layers)), np.nan)
    for r in rows:
        m[seeds.index(r["seed"]), layers.index(r["layer"])] = r[value]
    return np.array(layers), m


def draw_layer_profile(ax, rows: Sequence[dict], placements: Sequence[str], overlay: Callable | None = None,
                       stack: str = "") -> None:
    """Per-block gradient norm of one stack at one step: geometric mean over seeds, min-max band."""
    by_placement = _by(rows, lambda r: r["placement"])
    n = 0
    for p in placements:
        sel = by_placement.get(p)
        if not sel:
            continue
        layers, m = _layer_matrix(sel)
        n = max(n, len(layers))
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-zero columns (ReZero at init): no point
            logm = np.log10(np.where(m > 0, m, np.nan))
            mean = 10 ** np.nanmean(logm, axis=0)
        ax.plot(layers, mean, color=color(p), label=label(p), lw=1.6)
        if m.shape[0] > 1:
            ax.fill_between(layers, np.nanmin(m, axis=0), np.nanmax(m, axis=0), color=color(p), alpha=0.2, lw=0)
        if overlay:
            overlay(ax, stack, p, layers)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"block k (0 = input side, {n - 1} = output side)")
    ax.set_ylabel(r"$\|\partial L/\partial\theta_k\|_2$")


def plot_grad_norms(rows: Sequence[dict], path_stem: str | Path, formats=("png",), steps: int = 0,
                    overlay: Callable | None = None, title: str = "") -> list[Path]:
    """Draw grad_norms.csv-style rows (whole-block rows are used) at the last recorded step.

    `overlay(ax, stack, placement, layers)` may draw a theory curve on each panel.
    """
    plt = setup()
    block = [r for r in rows if r["sublayer"] == "block"]
    stacks = [s for s in ("encoder", "decoder") if any(r["stack"] == s for r in block)]
    stacks += sorted({r["stack"] for r in block} - set(stacks))
    placements = list(dict.fromkeys(r["placement"] for r in block))
    last = max(r["step"] for r in block)
    nrows = 2 if last > 0 else 1
    fig, axes = plt.subplots(nrows, len(stacks), figsize=(max(6.4, 4.6 * len(stacks)), 3.6 * nrows), squeeze=False)

    groups = _by(block, lambda r: (r["stack"], r["step"]))
    for j, stack in enumerate(stacks):
        ax = axes[0, j]
        draw_layer_profile(ax, groups.get((stack, last), []), placements, overlay, stack)
        when = "at initialization" if last == 0 else f"after {last} Adam steps"
        ax.set_title(f"{stack}: per-block gradient norm {when}")
        ax.legend(loc="best", frameon=False)

        if nrows == 2:
            ax = axes[1, j]
            for p in placements:
                ratio_by_step = {}
                for step in range(last + 1):
                    sel = [r for r in groups.get((stack, step), []) if r["placement"] == p]
                    if sel:
                        _, m = _layer_matrix(sel)
                        with np.errstate(divide="ignore", invalid="ignore"):
                            ratio_by_step[step] = 10 ** np.nanmean(np.log10(m[:, 0] / m[:, -1]))
                xs = sorted(ratio_by_step)
                ax.plot(xs, [ratio_by_step[s] for s in xs], color=color(p), label=label(p), lw=1.6)
            ax.axhline(1.0, color="black", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_xlabel("Adam step")
            ax.set_ylabel("first block / last block grad norm")
            ax.set_title(f"{stack}: vanishing toward the input over training")
            ax.legend(loc="best", frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path_stem, formats)


def plot_depth_grid(panels: dict[tuple[str, int], Sequence[dict]], path_stem: str | Path, formats=("png",),
                    title: str = "") -> list[Path]:
    """Rows: settings (e.g. "seq2seq decoder"); columns: depths. `panels[(setting, depth)]` = block rows."""
    plt = setup()
    settings = list(dict.fromkeys(s for s, _ in panels))
    depths = sorted({d for _, d in panels})
    fig, axes = plt.subplots(len(settings), len(depths), figsize=(3.3 * len(depths), 2.9 * len(settings)),
                             squeeze=False)
    for i, setting in enumerate(settings):
        for j, depth in enumerate(depths):
            ax = axes[i, j]
            rows = panels.get((setting, depth), [])
            draw_layer_profile(ax, rows, list(dict.fromkeys(r["placement"] for r in rows)))
            ax.set_title(f"{setting}, N = {depth}")
            if j:
                ax.set_ylabel("")
            if i == 0 and j == 0:
                ax.legend(loc="best", frameon=False, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path_stem, formats)
