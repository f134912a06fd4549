"""Figures of `grad-norms --ckpt` and `diagnose`: per-block gradient norms of checkpoints, drawn as given.

One panel per stack, block index on x (0 = input side), the whole-block parameter-gradient norm
on a log y axis, one line per checkpoint. A checkpoint is coloured by its detected placement
when the compared checkpoints all differ in placement, else by a fixed cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.ticker import MaxNLocator

from .style import color, save, setup

CYCLE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_checkpoint_gradients(rows: Sequence[dict], models: dict[str, dict], stem: str | Path,
                              formats: Sequence[str] = ("png",)) -> list[Path]:
    """rows: grad_norms.csv rows (placement = model label); models: label -> {"placement", "loss", ...}."""
    plt = setup()
    block = [r for r in rows if r["sublayer"] == "block"]
    stacks = [s for s in ("encoder", "decoder") if any(r["stack"] == s for r in block)]
    stacks += sorted({r["stack"] for r in block} - set(stacks))
    labels = list(dict.fromkeys(r["placement"] for r in block))
    placements = [models.get(m, {}).get("placement", "?") for m in labels]
    by_placement = len(set(placements)) == len(labels)
    fig, axes = plt.subplots(1, max(1, len(stacks)), figsize=(max(6.4, 4.8 * len(stacks)), 3.8), squeeze=False)
    for j, stack in enumerate(stacks):
        ax = axes[0, j]
        n = 0
        for i, m in enumerate(labels):
            sel = sorted((int(r["layer"]), float(r["param_grad_norm"])) for r in block
                         if r["placement"] == m and r["stack"] == stack)
            if not sel:
                continue
            n = max(n, len(sel))
            c = color(placements[i]) if by_placement else CYCLE[i % len(CYCLE)]
            info = models.get(m, {})
            name = f"{m} ({placements[i]}, {info.get('loss', '?')})"
            ax.plot([k for k, _ in sel], [v if v > 0 else float("nan") for _, v in sel], color=c, lw=1.6,
                    marker=MARKERS[i % len(MARKERS)], ms=3.5, mfc="none" if i else c, label=name)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"block k (0 = input side, {n - 1} = output side)")
        ax.set_ylabel(r"$\|\partial L/\partial\theta_k\|_2$")
        ax.set_title(f"{stack}: per-block gradient norm, one gradient on text")
        ax.legend(loc="best", frameon=False, fontsize=8)
    fig.tight_layout()
    return save(fig, stem, formats)
