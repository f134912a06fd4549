"""Figures of the instability study: Wortsman et al.'s lr-sensitivity curve (final loss vs lr per
variant) and the largest attention logit against step per lr."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .style import save, setup

VARIANT_STYLE = {
    "baseline": ("#d62728", "o", "Pre-LN"),
    "qk-norm": ("#1f77b4", "s", "Pre-LN + QK-norm"),
}


def _variant(name: str) -> tuple[str, str, str]:
    return VARIANT_STYLE.get(name, ("#333333", "d", name))


def plot_lr_sensitivity(
    table: Sequence[Mapping], margin: float, stem: str | Path, title: str = "", formats=("png",)
) -> list[Path]:
    """Final held-out loss against peak lr (log axis), one line per variant through the seeds' mean,
    each seed a point; a diverged run is an x at the top; the band is the best run + margin."""
    plt = setup()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    finite = [r["final_val_loss"] for r in table if math.isfinite(r["final_val_loss"])]
    top = max(finite) + 0.1 if finite else 1.0
    for variant in dict.fromkeys(r["variant"] for r in table):
        c, m, label = _variant(variant)
        rows = [r for r in table if r["variant"] == variant]
        lrs = sorted({r["lr"] for r in rows})
        means = [
            np.mean([r["final_val_loss"] for r in rows if r["lr"] == lr]) for lr in lrs
        ]  # NaN where a seed diverged
        ax.plot(lrs, means, color=c, marker=m, lw=1.6, label=f"{label} (mean of seeds)")
        for r in rows:
            if math.isfinite(r["final_val_loss"]):
                ax.plot(r["lr"], r["final_val_loss"], m, color=c, mfc="none", ms=5, alpha=0.7)
            else:
                ax.plot(r["lr"], top, "x", color=c, ms=8, mew=2)
    best = min(finite) if finite else math.nan
    ax.axhspan(best, best + margin, color="0.85", zorder=0, label=f"best run + {margin:g} nats")
    ax.set_xscale("log")
    ax.set(
        xlabel="peak learning rate",
        ylabel="final held-out loss (nats/byte)",
        title=(title + "\n" if title else "") + "lr sensitivity (Wortsman et al. 2023)",
    )
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return save(fig, stem, formats)


def plot_logits(
    curves: Mapping[tuple[str, float, int], Mapping[int, float]],
    limit: float,
    stem: str | Path,
    formats=("png",),
) -> list[Path]:
    """The largest attention logit over blocks against step, one panel per variant, one colour
    per lr (seeds: solid, dashed), the precursor limit dashed red; log axis."""
    plt = setup()
    variants = list(dict.fromkeys(v for v, _, _ in curves))
    lrs = sorted({lr for _, lr, _ in curves})
    seeds = sorted({s for _, _, s in curves})
    colors = dict(zip(lrs, plt.get_cmap("plasma")(np.linspace(0.0, 0.8, len(lrs)))))
    fig, axes = plt.subplots(1, len(variants), figsize=(4.8 * len(variants), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, variant in zip(axes, variants):
        for (v, lr, seed), curve in sorted(curves.items()):
            if v != variant or not curve:
                continue
            steps = sorted(curve)
            y = np.array([curve[s] for s in steps], dtype=float)
            ax.plot(
                steps,
                np.where(np.isfinite(y) & (y > 0), y, np.nan),
                color=colors[lr],
                ls="-" if seed == seeds[0] else "--",
                lw=1.4,
                label=f"lr {lr:g}" if seed == seeds[0] else None,
            )
        ax.axhline(limit, color="#d62728", lw=0.9, ls=":", label=f"precursor limit {limit:g}")
        ax.set_yscale("log")
        ax.set(
            xlabel="optimizer step",
            title=_variant(variant)[2],
        )
        ax.legend(fontsize=8, frameon=False)
    axes[0].set_ylabel("largest attention logit (over blocks)")
    if len(seeds) > 1:
        fig.text(0.99, 0.01, f"solid: seed {seeds[0]}; dashed: other seeds", ha="right", fontsize=7)
    fig.tight_layout()
    return save(fig, stem, formats)
