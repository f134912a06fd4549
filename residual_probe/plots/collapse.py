"""Figures of the `collapse` job, drawn from its tidy rows (no metric is computed here).

- collapse_curves: adjacent cosine and block influence (1 - cos, ShortGPT) per block, with the
  Pre-LN toy-model prediction sqrt(k / (k + 1)) (given by the job, from analysis.theory) dashed;
- similarity: layer x layer mean cosine and linear CKA heatmaps (seaborn);
- norm_growth: E||h_k||^2 / d and the relative update per block (log scales: Pre-LN grows ~k).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..analysis.rows import by_layer
from ..analysis.verdicts import stream_name
from ..models.placements import pre_ln_like
from .style import color, save, setup

LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")  # per model, so models with identical curves stay visible


def _series(
    rows: list[dict], metric: str
) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]:
    """{(model, stack, stream): (layers, values)} for one metric, layers sorted."""
    acc = by_layer((r for r in rows if r["metric"] == metric), keys=("model", "stack", "stream"))
    return {k: (np.array(sorted(v)), np.array([v[i] for i in sorted(v)])) for k, v in acc.items()}


def _styler(keys, placements: dict[str, str]):
    """Colour by model (its placement's colour when models differ in placement), line style by stack/stream."""
    models = list(dict.fromkeys(k[0] for k in keys))
    parts = list(dict.fromkeys(k[1:] for k in keys))
    by_placement = len(set(placements.get(m) for m in models)) == len(models)
    cycle = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]

    def style(key):
        model, stack, stream = key
        if len(models) == 1 and len(parts) > 1:  # one model: its streams told apart by colour too
            c = cycle[parts.index(key[1:]) % len(cycle)]
        else:
            c = (
                color(placements.get(model, ""))
                if by_placement
                else cycle[models.index(model) % len(cycle)]
            )
        name = [model] if len(models) > 1 else []
        if len(parts) > 1:
            name.append(stream_name(stack, stream, always=any(p[1] != "x" for p in parts)))
        label = " · ".join(name) or model
        if len(models) == 1:
            label += f" ({placements.get(model, '?')})"
        i = models.index(model)
        return dict(
            color=c,
            ls=LINESTYLES[parts.index(key[1:]) % len(LINESTYLES)],
            label=label,
            marker=MARKERS[i % len(MARKERS)],
            ms=6 - 1.5 * min(i, 2),
            mfc="none" if i else c,
            alpha=0.9,
        )

    return style


def plot_collapse_curves(
    rows: list[dict],
    placements: dict[str, str],
    theory: dict[str, np.ndarray],
    stem: str | Path,
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    """theory: the Pre-LN toy model's cos_adjacent and block_influence for blocks k = 0..N-1, drawn dashed."""
    plt = setup()
    cos, infl = _series(rows, "cos_adjacent"), _series(rows, "block_influence")
    style = _styler(list(cos), placements)
    n_keys = len(set(cos) | set(infl))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8 + 0.25 * math.ceil(n_keys / 3)))
    k = np.arange(len(theory["cos_adjacent"]))
    # The toy model's sqrt(k/(k+1)) is the Pre-LN stream's (and ResiDual's Pre-LN-like d stream's):
    # drawn only when such a stream is on the figure, labelled with its source.
    pre_ln = [key for key in cos if pre_ln_like(placements.get(key[0]), key[2])]
    if pre_ln:
        src = r"Pre-LN theory $\sqrt{k/(k+1)}$ (ResiDual, Xie et al. 2023)"
        a.plot(k, theory["cos_adjacent"], color="black", ls="--", lw=1, label=src)
        b.plot(k, theory["block_influence"], color="black", ls="--", lw=1, label="_" + src)
    for key, (x, y) in cos.items():
        a.plot(x, y, **style(key))
    a.set(
        xlabel="block k",
        ylabel=r"adjacent cosine  cos$(h_{k-1}, h_k)$",
        title="How alike each block's input and output are",
    )
    for key, (x, y) in infl.items():
        b.plot(x, np.clip(y, 1e-8, None), **style(key))
    b.set_yscale("log")
    b.set(
        xlabel="block k",
        ylabel="block influence  1 − cos",
        title="How much each block changes the stream",
    )
    _legend_below(fig, a)
    return save(fig, stem, formats)


def _legend_below(fig, ax) -> None:
    """`ax`'s legend for the whole figure, below the panels (never over the data), 3 a row."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(3, max(1, len(labels))),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / 3) + 0.02, 1, 1))


def plot_norm_growth(
    rows: list[dict],
    placements: dict[str, str],
    stem: str | Path,
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    plt = setup()
    norms, rel = _series(rows, "norm_sq_per_dim"), _series(rows, "relative_update")
    medians, maxima = _series(rows, "norm_sq_per_dim_median"), _series(rows, "norm_sq_per_dim_max")
    style = _styler(list(norms), placements)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8 + 0.25 * math.ceil(len(norms) / 3)))
    for key, (x, y) in norms.items():
        a.plot(x, y, **style(key))
        c = style(key).get("color")
        if (
            key in medians
        ):  # the median token and the largest: a few massive tokens move the mean alone
            a.plot(*medians[key], color=c, ls="--", lw=1.0, alpha=0.8)
            a.plot(*maxima[key], color=c, ls=":", lw=1.0, alpha=0.8)
    if medians:
        a.plot([], [], color="0.3", ls="--", lw=1.0, label="median token")
        a.plot([], [], color="0.3", ls=":", lw=1.0, label="largest token")
    a.set_yscale("log")
    a.set(
        xlabel="block k",
        ylabel=r"$\|h_k\|^2 / d$ (solid: mean)",
        title="Residual-stream magnitude per block output",
    )
    for key, (x, y) in rel.items():
        b.plot(x, np.clip(y, 1e-8, None), **style(key))
    b.set_yscale("log")
    b.set(
        xlabel="block k",
        ylabel=r"$\|h_k - h_{k-1}\| / \|h_{k-1}\|$",
        title="Relative update per block",
    )
    _legend_below(fig, a)
    return save(fig, stem, formats)


def plot_similarity(
    sim: pd.DataFrame, stem: str | Path, formats: Sequence[str] = ("png",)
) -> list[Path]:
    """Heatmaps of similarity.csv's table (model, stack, stream, metric, layer_i, layer_j, value):
    every (model, stack, stream) gets its mean-cosine and linear-CKA pair, two pairs per row when there
    are more than two, so the figure grows with the comparison and leaves nothing out."""
    import seaborn as sns

    plt = setup()
    keys = list(
        dict.fromkeys(zip(sim["model"], sim["stack"], sim["stream"]))
    )  # every combination, none left out
    per_row = 2 if len(keys) > 2 else 1  # (cosine, CKA) pairs side by side, rows added as needed
    n_rows = max(1, math.ceil(len(keys) / per_row))
    fig, axes = plt.subplots(
        n_rows, 2 * per_row, figsize=(4.4 * 2 * per_row, 3.7 * n_rows), squeeze=False
    )
    # sns.heatmap draws the whole figure once per call (to see whether tick labels overlap): with
    # every panel visible, 16 panels cost 16 whole-figure draws (7 s). So each panel is shown only
    # while it is made, and the panels made (with their colour bars) are shown again at the end;
    # the spare panels of a last, half-filled row stay hidden.
    for ax in axes.flat:
        ax.set_visible(False)
    drawn = []
    for i, key in enumerate(keys):
        row, base = divmod(i, per_row)
        for col, metric in enumerate(("cosine", "cka")):
            sel = sim[
                (sim["model"] == key[0])
                & (sim["stack"] == key[1])
                & (sim["stream"] == key[2])
                & (sim["metric"] == metric)
            ]
            grid = sel.pivot_table(
                index="layer_i", columns="layer_j", values="value", aggfunc="first"
            )
            ax = axes[row][2 * base + col]
            ax.set_visible(True)
            stride = max(
                1, -(-len(grid) // 12)
            )  # at most ~12 labels per axis: 30 layers stay readable
            sns.heatmap(
                grid,
                ax=ax,
                cmap="viridis",
                vmin=min(0.0, float(np.nanmin(grid.to_numpy()))),
                vmax=1.0,
                square=True,
                cbar_kws={"fraction": 0.046, "pad": 0.04},
                xticklabels=stride,
                yticklabels=stride,
            )
            ax.invert_yaxis()  # layer -1 (the embedding) at the origin
            ax.grid(False)
            ax.tick_params(axis="y", labelrotation=0)
            name = "mean cosine" if metric == "cosine" else "linear CKA"
            ax.set(
                xlabel="layer j (−1 = embedding)",
                ylabel="layer i",
                title=f"{key[0]} · {key[1]} {key[2]}: {name}",
            )
            for shown in fig.axes:  # this panel and its colour bar
                if shown.get_visible():
                    shown.set_visible(False)
                    drawn.append(shown)
    for ax in drawn:
        ax.set_visible(True)
    fig.tight_layout()
    return save(fig, stem, formats)
