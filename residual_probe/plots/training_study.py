"""Figures of the training study: per-layer block influence of trained models, gradient ratio over steps."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .style import color, save, setup


def _style(name: str) -> str:
    return "--" if "no warm-up" in name else "-"


def plot_collapse_profiles(profiles: Mapping[str, Mapping[int, float]], path_stem: str | Path, formats=("png",)) -> list[Path]:
    """Block influence 1 - cos(h_{k-1}, h_k) per layer, one line per run (label -> {layer: value})."""
    plt = setup()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for name, prof in profiles.items():
        ks = sorted(prof)
        ax.plot(ks, [prof[k] for k in ks], _style(name), color=color(name.split()[0]), label=name, lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("block k")
    ax.set_ylabel(r"block influence $1-\cos(h_{k-1}, h_k)$")
    ax.set_title("How much each block changes the residual stream\n(trained models, held-out text)")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return save(fig, path_stem, formats)


def plot_ratio_curves(curves: Mapping[str, Mapping[int, float]], path_stem: str | Path, formats=("png",)) -> list[Path]:
    """First-block / last-block gradient norm over training steps, one line per run."""
    plt = setup()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for name, curve in curves.items():
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], _style(name), color=color(name.split()[0]), label=name, lw=1.5)
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("block 0 / block N-1 gradient norm")
    ax.set_title("Vanishing toward the input during training")
    ax.legend(frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: curves span the plot
    fig.tight_layout()
    return save(fig, path_stem, formats)
