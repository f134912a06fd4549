"""Figures of one probe sink (a user's own training run), drawn by `residual-probe plot`.

Inputs are the job's tables, {(stack, stream): {step: {layer: value}}}; nothing is computed
here beyond choosing what to draw. A non-finite value is never dropped silently: a heatmap cell
is hatched red, a curve point becomes a red x on the panel's edge, and the legend says so.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..analysis.verdicts import stream_name
from .style import save, setup

Table = Mapping[tuple[str, str], Mapping[int, Mapping[int, float]]]
NAN_COLOR = "#d62728"
STACK_ORDER = ("encoder", "decoder")
# grad_steps: event origin blocks beyond the first, median and last (not red: events and NaN are)
EVENT_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def _keys(table: Table) -> list[tuple[str, str]]:
    """Panels in reading order: encoder, decoder, other stacks; a stack's x stream before its others."""

    def rank(k):
        stack_rank = STACK_ORDER.index(k[0]) if k[0] in STACK_ORDER else len(STACK_ORDER)
        return stack_rank, k[0], k[1] not in ("x", "-"), k[1]

    return sorted(table, key=rank)


def _title(key: tuple[str, str], keys: Sequence[tuple[str, str]] = ()) -> str:
    """The stack's name, and the stream's where the stack carries more than one."""
    stack, stream = key
    return stream_name(stack, stream, always=sum(1 for k in keys if k[0] == stack) > 1)


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _matrix(
    by_step: Mapping[int, Mapping[int, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, layers, values (layers x steps, NaN where missing), recorded mask)."""
    steps = np.array(sorted(by_step))
    layers = np.array(sorted({k for v in by_step.values() for k in v}))
    m = np.full((len(layers), len(steps)), np.nan)
    present = np.zeros_like(m, dtype=bool)
    for j, s in enumerate(steps):
        for i, k in enumerate(layers):
            if k in by_step[s]:
                m[i, j] = by_step[s][k]
                present[i, j] = True
    return steps, layers, np.where(present, m, np.nan), present


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres (half-way between neighbours)."""
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _grid(plt, n: int, width: float = 4.8, height: float = 3.4, rows: int = 1):
    fig, axes = plt.subplots(rows, n, figsize=(max(6.0, width * n), height * rows), squeeze=False)
    return fig, axes


def _mark_nonfinite(ax, xs, ys, at_top: bool = True, label: bool = False) -> bool:
    """Red x at the panel's top edge for every non-finite y; True if any was drawn."""
    import matplotlib.transforms as mtransforms

    xs = np.asarray(xs, dtype=float)
    bad = ~np.isfinite(np.asarray(ys, dtype=float))
    if not bad.any():
        return False
    trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    ax.plot(
        xs[bad],
        np.full(bad.sum(), 0.97 if at_top else 0.03),
        "x",
        color=NAN_COLOR,
        ms=7,
        mew=1.8,
        transform=trans,
        clip_on=False,
        label="NaN/inf" if label else None,
    )
    return True


def grad_heatmap(grads: Table, stem: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Per-block gradient norm, block x step, log colour scale; one panel per stack."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Patch

    plt = setup()
    keys = _keys(grads)
    fig, axes = _grid(plt, len(keys), width=5.4, height=3.8)
    for ax, key in zip(axes[0], keys):
        steps, layers, m, present = _matrix(grads[key])
        finite = np.isfinite(m) & (m > 0)
        lo, hi = (np.nanmin(m[finite]), np.nanmax(m[finite])) if finite.any() else (1e-3, 1.0)
        if hi <= lo:
            lo, hi = lo / 2, hi * 2
        mesh = ax.pcolormesh(
            _edges(steps.astype(float)),
            _edges(layers.astype(float)),
            np.ma.masked_where(~finite, m),
            norm=LogNorm(lo, hi),
            cmap="viridis",
            shading="flat",
        )
        ax.grid(False)
        fig.colorbar(mesh, ax=ax, pad=0.02).set_label(
            r"$\|\partial L/\partial\theta_k\|_2$ (log scale)"
        )
        bad = present & ~finite
        handles = []
        if bad.any():
            ii, jj = np.nonzero(bad)
            ax.scatter(steps[jj], layers[ii], marker="x", color=NAN_COLOR, s=18, lw=1.2, zorder=3)
            handles.append(Patch(color=NAN_COLOR, label=f"NaN/inf/0 ({int(bad.sum())} cells)"))
        if (~present).any():
            handles.append(Patch(facecolor="white", edgecolor="0.6", label="not recorded"))
        if handles:
            ax.legend(handles=handles, loc="upper left", fontsize=8, framealpha=0.9)
        ax.set(
            xlabel="optimizer step",
            ylabel="block k (0 = input side)",
            title=f"{_title(key)}: per-block gradient norm",
        )
        if len(layers) <= 24:
            ax.set_yticks(layers[:: max(1, len(layers) // 12)])
    fig.tight_layout()
    return save(fig, stem, formats)


def grad_steps(
    grads: Table,
    ratios: Mapping[tuple[str, str], tuple[Sequence[int], Sequence[float]]],
    stem: str | Path,
    formats: Sequence[str] = ("png",),
    events: Sequence[tuple[int, str, int]] = (),
) -> list[Path]:
    """Top: the first, median and last block's gradient norm against step, and every instability
    event's origin block (a spike is drawn where it happened). Bottom: first/last ratio.

    events: (step, stack, origin block) of the instability events (`analysis.instability`): a red
    vertical line at the step on the origin stack's panels, labelled with the origin block."""
    plt = setup()
    keys = _keys(grads)
    fig, axes = _grid(plt, len(keys), width=4.8, height=3.1, rows=2)
    styles = (("#1f77b4", "-"), ("#7f7f7f", "--"), ("#ff7f0e", "-"))
    for j, key in enumerate(keys):
        ax = axes[0, j]
        steps, layers, m, _ = _matrix(grads[key])
        mine = [e for e in events if e[1] == key[0]]
        role = {0: "first", len(layers) // 2: "median", len(layers) - 1: "last"}
        origins = [list(layers).index(e[2]) for e in mine if e[2] in layers]
        picks = dict.fromkeys([*role, *sorted(origins)])  # the three, then each event's origin
        extra = itertools.cycle(EVENT_COLORS)
        marked = False
        for n, i in enumerate(picks):
            c, ls = styles[n] if n < len(styles) else (next(extra), "-")
            y = m[i]
            what = ", ".join(
                ([role[i]] if i in role else []) + (["event origin"] if i in origins else [])
            )
            ax.plot(
                steps,
                np.where(np.isfinite(y) & (y > 0), y, np.nan),
                color=c,
                ls=ls,
                lw=1.5 if i in role else 1.2,
                label=f"block {layers[i]} ({what})",
            )
            marked |= _mark_nonfinite(ax, steps, np.where(y > 0, y, np.nan), label=not marked)
        ax.set_yscale("log")
        for i, (step, _stack, block) in enumerate(mine):
            for a in (ax, axes[1, j]):
                a.axvline(
                    step,
                    color="#d62728",
                    lw=0.9,
                    ls="--",
                    alpha=0.8,
                    label="instability event" if (i == 0 and a is ax) else None,
                )
            ax.annotate(
                f"block {block}",
                (step, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=6.5,
                color="#d62728",
            )
        ax.set(
            xlabel="optimizer step",
            ylabel=r"$\|\partial L/\partial\theta_k\|_2$",
            title=f"{_title(key)}: gradient norm by block",
        )
        ax.legend(fontsize=8, frameon=False)
        ax = axes[1, j]
        xs, ys = ratios[key]
        ys = np.asarray(ys, dtype=float)
        ax.plot(xs, np.where(np.isfinite(ys) & (ys > 0), ys, np.nan), color="black", lw=1.5)
        _mark_nonfinite(ax, xs, np.where(ys > 0, ys, np.nan), label=True)
        ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set(
            xlabel="optimizer step",
            ylabel=f"block {layers[0]} / block {layers[-1]}",
            title=f"{_title(key)}: first / last block gradient (< 1: vanishing)",
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return save(fig, stem, formats)


def _step_colors(plt, steps: Sequence[int]) -> dict[int, tuple]:
    cmap = plt.get_cmap("viridis")
    n = max(1, len(steps) - 1)
    return {s: cmap(0.85 * i / n) for i, s in enumerate(steps)}


def act_grad(
    act: Table, steps: Sequence[int], stem: str | Path, formats: Sequence[str] = ("png",)
) -> list[Path]:
    """Activation-gradient norm RMS_t ||dL/dh_k|| per block at the chosen steps; one panel per stack,
    one line style per stream."""
    plt = setup()
    stacks = list(dict.fromkeys(k[0] for k in _keys(act)))
    fig, axes = _grid(plt, len(stacks), width=4.8, height=3.6)
    colors = _step_colors(plt, steps)
    for ax, stack in zip(axes[0], stacks):
        streams = [k for k in _keys(act) if k[0] == stack]
        marked = False
        for si, key in enumerate(streams):
            for s in steps:
                by_layer = act[key].get(s)
                if not by_layer:
                    continue
                xs = np.array(sorted(by_layer))
                ys = np.array([by_layer[k] for k in xs])
                name = f"step {s}" + (f", stream {key[1]}" if len(streams) > 1 else "")
                ax.plot(
                    xs,
                    np.where(np.isfinite(ys) & (ys > 0), ys, np.nan),
                    color=colors[s],
                    ls=("-", "--", ":")[si % 3],
                    marker="o",
                    ms=3,
                    lw=1.4,
                    label=name,
                )
                marked |= _mark_nonfinite(ax, xs, np.where(ys > 0, ys, np.nan), label=not marked)
        ax.set_yscale("log")
        ax.set(
            xlabel="block k (0 = input side)",
            ylabel=r"RMS$_t\,\|\partial L/\partial h_k\|$",
            title=f"{stack}: activation gradient per block",
        )
        _integer_x(ax)
        n_labels = len(ax.get_legend_handles_labels()[1])
        # below the panel: the late steps' curves cross the whole plot, so no corner is free
        ax.legend(
            fontsize=8,
            frameon=False,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=min(3, max(1, n_labels)),
        )
    fig.tight_layout()
    return save(fig, stem, formats)


def collapse(
    cos: Table,
    infl: Table,
    steps: Sequence[int],
    reference: Mapping[tuple[str, str], "np.ndarray | None"],
    placement: str | None,
    stem: str | Path,
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    """Adjacent cosine (top) and block influence 1 - cos (bottom, log) per block at the chosen steps.

    reference[(stack, stream)]: the Pre-LN collapse reference sqrt(k/(k+1)) per block (ResiDual's
    toy model, `analysis.theory.collapse_prediction`) where the stream is Pre-LN-like, else None.
    """
    plt = setup()
    keys = _keys(cos)
    fig, axes = _grid(plt, len(keys), width=4.8, height=3.3, rows=2)
    colors = _step_colors(plt, steps)
    for j, key in enumerate(keys):
        top, bottom = axes[0, j], axes[1, j]
        n = 0
        marked = False
        for s in steps:
            by_layer = cos[key].get(s)
            if not by_layer:
                continue
            xs = np.array(sorted(by_layer))
            n = max(n, len(xs))
            ys = np.array([by_layer[k] for k in xs])
            top.plot(xs, ys, color=colors[s], marker="o", ms=3, lw=1.4, label=f"step {s}")
            marked |= _mark_nonfinite(top, xs, ys, at_top=False, label=not marked)
            ib = infl.get(key, {}).get(s, {})
            yi = np.array([ib.get(k, math.nan) for k in xs])
            bottom.plot(
                xs,
                np.where(yi > 0, yi, np.nan),
                color=colors[s],
                marker="o",
                ms=3,
                lw=1.4,
                label=f"step {s}",
            )
            _mark_nonfinite(bottom, xs, yi)
        pred = reference.get(key)
        if pred is not None and n:
            k = np.arange(len(pred))
            top.plot(
                k,
                pred,
                color="black",
                ls="--",
                lw=1,
                label="Pre-LN toy model $\\sqrt{k/(k+1)}$\n(ResiDual, Xie et al. 2023)",
            )
            bottom.plot(k, 1 - pred, color="black", ls="--", lw=1, label="Pre-LN toy model")
        what = f" ({placement})" if placement else ""
        top.set(
            xlabel="block k",
            ylabel=r"cos$(h_{k-1}, h_k)$",
            title=f"{_title(key, keys)}{what}: adjacent cosine",
        )
        bottom.set_yscale("log")
        bottom.set(
            xlabel="block k",
            ylabel="block influence 1 − cos",
            title=f"{_title(key, keys)}: block influence",
        )
        for ax in (top, bottom):
            _integer_x(ax)
            ax.legend(fontsize=8, frameon=False, loc="best")
    if all(v is None for v in reference.values()):
        why = (
            f"not drawn for {placement}"
            if placement
            else "not drawn: placement unknown (--placement)"
        )
        fig.text(
            0.5, -0.01, f"Pre-LN collapse reference {why}", ha="center", fontsize=8, color="0.35"
        )
    fig.tight_layout()
    return save(fig, stem, formats)


def attention(
    logit_max: Table,
    entropy: Table,
    limit: float,
    stem: str | Path,
    formats: Sequence[str] = ("png",),
    warnings: Sequence[tuple[int, str, int, str]] = (),
) -> list[Path]:
    """Top: each block's largest attention logit against step and the precursor rule's limit, on a
    symmetric log axis (linear within +-1: the largest logit of a block can be negative early on);
    bottom: each block's mean attention entropy (nats). One column per stack.

    warnings: (step, stack, block, series) of the precursor warnings: a circle on the block's
    curve at the step it warned, on the panel of its series (attn_logit_max or attn_entropy)."""
    plt = setup()
    keys = _keys(logit_max or entropy)
    fig, axes = _grid(plt, len(keys), width=4.8, height=3.1, rows=2)
    for j, key in enumerate(keys):
        panels = (
            (axes[0, j], logit_max, True, "attn_logit_max"),
            (axes[1, j], entropy, False, "attn_entropy"),
        )
        for ax, table, log, metric in panels:
            if key not in table:
                ax.set_axis_off()
                continue
            steps, layers, m, _ = _matrix(table[key])
            colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(layers), 1)))
            for i, k in enumerate(layers):
                y = np.where(np.isfinite(m[i]), m[i], np.nan)
                ax.plot(steps, y, color=colors[i], lw=1.4, label=f"block {k}")
                _mark_nonfinite(ax, steps, m[i], label=(i == 0))
                at = [
                    s
                    for s, stack, b, what in warnings
                    if what == metric and stack == key[0] and b == k and s in steps
                ]
                if at:
                    idx = [list(steps).index(s) for s in at]
                    ax.plot(steps[idx], y[idx], "o", mfc="none", mec="#d62728", ms=7, mew=1.5)
            if log:
                ax.axhline(limit, color="#d62728", lw=0.9, ls="--", label=f"limit {limit:g}")
                ax.set_yscale("symlog", linthresh=1.0)
                ax.set(
                    ylabel="largest attention logit",
                    title=f"{_title(key)}: max attention logit by block",
                )
            else:
                ax.set(
                    ylabel="mean attention entropy (nats)",
                    title=f"{_title(key)}: attention entropy by block",
                )
            ax.set_xlabel("optimizer step")
            if warnings and j == 0:
                ax.plot([], [], "o", mfc="none", mec="#d62728", label="precursor warning")
            ax.legend(fontsize=7, frameon=False, ncol=2)
    fig.tight_layout()
    return save(fig, stem, formats)
