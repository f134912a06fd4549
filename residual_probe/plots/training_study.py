"""Figures of the training study: per-layer block influence of trained models, gradient ratio over steps.

Both draw {run label: {x: value}} as one line per run, coloured by the run's placement (run label ->
placement, from the caller); runs in `dashed` (without warm-up) are drawn dashed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Mapping

from .style import color, save, setup


def _runs(
    series: Mapping[str, Mapping[int, float]],
    placements: Mapping[str, str],
    dashed: Collection[str],
):
    """A figure with one line per run on a log scale: (fig, ax)."""
    plt = setup()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for name, curve in series.items():
        xs = sorted(curve)
        ax.plot(
            xs,
            [curve[x] for x in xs],
            "--" if name in dashed else "-",
            color=color(placements[name]),
            label=name,
            lw=1.5,
        )
    ax.set_yscale("log")
    return fig, ax


def plot_collapse_profiles(
    profiles: Mapping[str, Mapping[int, float]],
    path_stem: str | Path,
    placements: Mapping[str, str],
    dashed: Collection[str] = (),
    formats=("png",),
) -> list[Path]:
    """Block influence 1 - cos(h_{k-1}, h_k) per layer, one line per run (label -> {layer: value})."""
    fig, ax = _runs(profiles, placements, dashed)
    ax.set(
        xlabel="block k",
        ylabel=r"block influence $1-\cos(h_{k-1}, h_k)$",
        title="How much each block changes the residual stream\n(trained models, held-out text)",
    )
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return save(fig, path_stem, formats)


def plot_ratio_curves(
    curves: Mapping[str, Mapping[int, float]],
    path_stem: str | Path,
    placements: Mapping[str, str],
    dashed: Collection[str] = (),
    formats=("png",),
) -> list[Path]:
    """First-block / last-block gradient norm over training steps, one line per run (label -> {step: ratio})."""
    fig, ax = _runs(curves, placements, dashed)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.set(
        xlabel="step",
        ylabel="block 0 / block N-1 gradient norm",
        title="Vanishing toward the input during training",
    )
    ax.legend(
        frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5)
    )  # outside: curves span the plot
    fig.tight_layout()
    return save(fig, path_stem, formats)
