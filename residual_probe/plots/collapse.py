"""Figures of the `collapse` job, drawn from its tidy rows (no metric is computed here).

- collapse_curves: adjacent cosine and block influence (1 - cos, ShortGPT) per block, with the
  Pre-LN toy-model prediction sqrt(k / (k + 1)) (given by the job, from analysis.theory) dashed;
- similarity: layer x layer mean cosine and linear CKA heatmaps (seaborn);
- norm_growth: E||h_k||^2 / d and the relative update per block (log scales: Pre-LN grows ~k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .style import color, save, setup

MAX_HEATMAP_ROWS = 6
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")  # per model, so models with identical curves stay visible


def _series(rows: list[dict], metric: str) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]:
    """{(model, stack, stream): (layers, values)} for one metric, layers sorted."""
    acc: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in rows:
        if r["metric"] == metric:
            acc.setdefault((r["model"], r["stack"], r["stream"]), {})[int(r["layer"])] = float(r["value"])
    return {k: (np.array(sorted(v)), np.array([v[i] for i in sorted(v)])) for k, v in acc.items()}


def _styler(keys, placements: dict[str, str]):
    """Colour by model (its placement's colour when models differ in placement), line style by stack/stream."""
    models = list(dict.fromkeys(k[0] for k in keys))
    parts = list(dict.fromkeys(k[1:] for k in keys))
    by_placement = len(set(placements.get(m) for m in models)) == len(models)
    cycle = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]

    def style(key):
        model, stack, stream = key
        c = color(placements.get(model, "")) if by_placement else cycle[models.index(model) % len(cycle)]
        name = [model] if len(models) > 1 else []
        if len(parts) > 1:
            name.append(f"{stack} {stream}" if stream != "x" or any(p[1] != "x" for p in parts) else stack)
        label = " · ".join(name) or model
        if len(models) == 1:
            label += f" ({placements.get(model, '?')})"
        i = models.index(model)
        return dict(color=c, ls=LINESTYLES[parts.index(key[1:]) % len(LINESTYLES)], label=label,
                    marker=MARKERS[i % len(MARKERS)], ms=6 - 1.5 * min(i, 2), mfc="none" if i else c, alpha=0.9)

    return style


def plot_collapse_curves(rows: list[dict], placements: dict[str, str], theory: dict[str, np.ndarray], stem: str | Path,
                         formats: Sequence[str] = ("png",)) -> list[Path]:
    """theory: the Pre-LN toy model's cos_adjacent and block_influence for blocks k = 0..N-1, drawn dashed."""
    plt = setup()
    cos, infl = _series(rows, "cos_adjacent"), _series(rows, "block_influence")
    style = _styler(list(cos), placements)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    k = np.arange(len(theory["cos_adjacent"]))
    for key, (x, y) in cos.items():
        a.plot(x, y, **style(key))
    a.plot(k, theory["cos_adjacent"], color="black", ls="--", lw=1, label=r"Pre-LN theory $\sqrt{k/(k+1)}$")
    a.set(xlabel="block k", ylabel=r"adjacent cosine  cos$(h_{k-1}, h_k)$", title="How alike each block's input and output are")
    for key, (x, y) in infl.items():
        b.plot(x, np.clip(y, 1e-8, None), **style(key))
    b.plot(k, theory["block_influence"], color="black", ls="--", lw=1, label="Pre-LN theory")
    b.set_yscale("log")
    b.set(xlabel="block k", ylabel="block influence  1 − cos", title="How much each block changes the stream")
    a.legend(loc="lower right", fontsize=8)
    b.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save(fig, stem, formats)


def plot_norm_growth(rows: list[dict], placements: dict[str, str], stem: str | Path,
                     formats: Sequence[str] = ("png",)) -> list[Path]:
    plt = setup()
    norms, rel = _series(rows, "norm_sq_per_dim"), _series(rows, "relative_update")
    style = _styler(list(norms), placements)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, (x, y) in norms.items():
        a.plot(x, y, **style(key))
    a.set_yscale("log")
    a.set(xlabel="block k", ylabel=r"$E\,\|h_k\|^2 / d$", title="Residual-stream magnitude per block output")
    for key, (x, y) in rel.items():
        b.plot(x, np.clip(y, 1e-8, None), **style(key))
    b.set_yscale("log")
    b.set(xlabel="block k", ylabel=r"$\|h_k - h_{k-1}\| / \|h_{k-1}\|$", title="Relative update per block")
    a.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, stem, formats)


def plot_similarity(sim: pd.DataFrame, stem: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Heatmaps of similarity.csv's table (model, stack, stream, metric, layer_i, layer_j, value):
    one row of panels per (model, stack, stream), mean cosine and linear CKA side by side."""
    import seaborn as sns

    plt = setup()
    keys = list(dict.fromkeys(zip(sim["model"], sim["stack"], sim["stream"])))[:MAX_HEATMAP_ROWS]
    fig, axes = plt.subplots(len(keys) or 1, 2, figsize=(9, 3.9 * max(1, len(keys))), squeeze=False)
    for row, key in enumerate(keys):
        for col, metric in enumerate(("cosine", "cka")):
            sel = sim[(sim["model"] == key[0]) & (sim["stack"] == key[1]) & (sim["stream"] == key[2])
                      & (sim["metric"] == metric)]
            grid = sel.pivot_table(index="layer_i", columns="layer_j", values="value", aggfunc="first")
            ax = axes[row][col]
            sns.heatmap(grid, ax=ax, cmap="viridis", vmin=min(0.0, float(np.nanmin(grid.to_numpy()))), vmax=1.0,
                        square=True, cbar_kws={"fraction": 0.046, "pad": 0.04})
            ax.invert_yaxis()  # layer -1 (the embedding) at the origin
            ax.grid(False)
            ax.tick_params(axis="y", labelrotation=0)
            name = "mean cosine" if metric == "cosine" else "linear CKA"
            ax.set(xlabel="layer j (−1 = embedding)", ylabel="layer i", title=f"{key[0]} · {key[1]} {key[2]}: {name}")
    fig.tight_layout()
    return save(fig, stem, formats)
