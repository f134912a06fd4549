"""Figures of the `collapse` job, drawn from its tidy rows (no metric is computed here).

- collapse_curves: adjacent cosine and block influence (1 - cos, ShortGPT) per block, with the
  Pre-LN toy-model prediction sqrt(k / (k + 1)) (analysis.theory) as a dashed reference;
- similarity: layer x layer mean cosine and linear CKA heatmaps;
- norm_growth: E||h_k||^2 / d and the relative update per block (log scales: Pre-LN grows ~k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

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


def plot_collapse_curves(rows: list[dict], placements: dict[str, str], stem: str | Path,
                         formats: Sequence[str] = ("png",)) -> list[Path]:
    from ..analysis.theory import collapse_prediction

    plt = setup()
    cos, infl = _series(rows, "cos_adjacent"), _series(rows, "block_influence")
    style = _styler(list(cos), placements)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    depth = max((len(x) for x, _ in cos.values()), default=1)
    k = np.arange(depth)
    theory = collapse_prediction("pre-ln", k + 1)["cos_adjacent"]  # block k (0-based) is the toy model's k + 1
    for key, (x, y) in cos.items():
        a.plot(x, y, **style(key))
    a.plot(k, theory, color="black", ls="--", lw=1, label=r"Pre-LN theory $\sqrt{k/(k+1)}$")
    a.set(xlabel="block k", ylabel=r"adjacent cosine  cos$(h_{k-1}, h_k)$", title="How alike each block's input and output are")
    for key, (x, y) in infl.items():
        b.plot(x, np.clip(y, 1e-8, None), **style(key))
    b.plot(k, 1 - theory, color="black", ls="--", lw=1, label="Pre-LN theory")
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


def plot_similarity(sim_rows: list[dict], stem: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    plt = setup()
    mats: dict[tuple[str, str, str], dict[str, dict[tuple[int, int], float]]] = {}
    for r in sim_rows:
        key = (r["model"], r["stack"], r["stream"])
        mats.setdefault(key, {}).setdefault(r["metric"], {})[(int(r["layer_i"]), int(r["layer_j"]))] = float(r["value"])
    keys = list(mats)[:MAX_HEATMAP_ROWS]
    fig, axes = plt.subplots(len(keys) or 1, 2, figsize=(9, 3.9 * max(1, len(keys))), squeeze=False)
    for row, key in enumerate(keys):
        for col, metric in enumerate(("cosine", "cka")):
            cells = mats[key][metric]
            n = max(i for i, _ in cells) + 2  # layers -1..n-2
            grid = np.full((n, n), np.nan)
            for (i, j), v in cells.items():
                grid[i + 1, j + 1] = v
            ax = axes[row][col]
            low = min(0.0, float(np.nanmin(grid)))
            im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=low, vmax=1.0,
                           extent=(-1.5, n - 1.5, -1.5, n - 1.5))
            ax.grid(False)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            name = "mean cosine" if metric == "cosine" else "linear CKA"
            ax.set(xlabel="layer j (−1 = embedding)", ylabel="layer i", title=f"{key[0]} · {key[1]} {key[2]}: {name}")
    fig.tight_layout()
    return save(fig, stem, formats)
