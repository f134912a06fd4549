"""Figures of `grad-norms --ckpt` and `diagnose`: per-block gradient norms of checkpoints, drawn as given.

One panel per stack, block index on x (0 = input side), the whole-block parameter-gradient norm
on a log y axis, one line per checkpoint. A checkpoint is coloured by its detected placement
when the compared checkpoints all differ in placement, else by a fixed cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.ticker import FuncFormatter, MaxNLocator

from .style import color, save, setup

CYCLE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_checkpoint_gradients(
    rows: Sequence[dict],
    models: dict[str, dict],
    stem: str | Path,
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    """rows: grad_norms.csv rows of checkpoints (model = its label); models: label -> {"placement", "loss", ...}."""
    plt = setup()
    block = [r for r in rows if r["sublayer"] == "block" and r["stack"] != "model"]
    labels = list(dict.fromkeys(r["model"] for r in block))
    stacks_of = {
        m: list(dict.fromkeys(r["stack"] for r in block if r["model"] == m)) for m in labels
    }
    if all(
        len(v) == 1 for v in stacks_of.values()
    ):  # one stack per model (decoder-only, encoder-only): one panel
        panels = {"": [(m, stacks_of[m][0]) for m in labels]}
    else:
        names = [s for s in ("encoder", "decoder") if any(s in v for v in stacks_of.values())]
        names += sorted({s for v in stacks_of.values() for s in v} - set(names))
        panels = {s: [(m, s) for m in labels if s in stacks_of[m]] for s in names}
    placements = [models.get(m, {}).get("placement", "?") for m in labels]
    by_placement = len(set(placements)) == len(labels)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(6.4, 4.8 * len(panels)), 3.8), squeeze=False
    )
    for j, (panel, members) in enumerate(panels.items()):
        ax = axes[0, j]
        n, values, depths = 0, [], set()
        for m, stack in members:
            i = labels.index(m)
            sel = sorted(
                (int(r["layer"]), float(r["param_grad_norm"]))
                for r in block
                if r["model"] == m and r["stack"] == stack
            )
            n = max(n, len(sel))
            depths.add(len(sel))
            values += [v for _, v in sel if v > 0]
            c = color(placements[i]) if by_placement else CYCLE[i % len(CYCLE)]
            info = models.get(m, {})
            name = f"{m} ({placements[i]}, {info.get('loss', '?')})" + (
                "" if panel else f", {stack}"
            )
            ax.plot(
                [k for k, _ in sel],
                [v if v > 0 else float("nan") for _, v in sel],
                color=c,
                lw=1.6,
                marker=MARKERS[i % len(MARKERS)],
                ms=3.5,
                mfc="none" if i else c,
                label=name,
            )
        ax.set_yscale("log")
        if values and max(values) < 10 * min(
            values
        ):  # under a decade: plain numbers, not 2.7 x 10^-1 minor ticks
            plain = FuncFormatter(lambda v, _: f"{v:.3g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(
            f"block k (0 = input side, {n - 1} = output side)"
            if len(depths) == 1
            else "block k (0 = input side; each model's last block is its output side)"
        )
        ax.set_ylabel(r"$\|\partial L/\partial\theta_k\|_2$")
        ax.set_title(
            f"{panel + ': ' if panel else ''}per-block gradient norm, one gradient on text"
        )
        ax.legend(loc="best", frameon=False, fontsize=8)
    fig.tight_layout()
    return save(fig, stem, formats)
