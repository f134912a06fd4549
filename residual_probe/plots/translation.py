"""Figures of the translation study (residual_probe/studies/translation/): BLEU beside the paper's,
held-out loss and BLEU over training, per-block gradients and block influence, ResiDual's streams.

Inputs are the study's tidy rows (lists of dicts); nothing here computes a metric.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..models.placements import PAPER_PLACEMENTS as PLACEMENTS
from .style import color, label, marker, save, setup


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _groups(table: Sequence[dict]) -> list[tuple[str, str, float]]:
    """(model, warm-up, lr) of the table's placement-grid rows (the alpha = 0 ablation is a check)."""
    seen = []
    for r in table:
        key = (r["model"], r["warmup"], float(r["lr"]))
        if float(r["alpha"]) == 1.0 and key not in seen:
            seen.append(key)
    return seen


def _group_label(model: str, warm: str, lr: float | None = None) -> str:
    return f"{model}\n{'warm-up' if warm == 'yes' else 'no warm-up'}" + (
        "" if lr is None else f"\nlr {lr:g}"
    )


def plot_bleu(
    table: Sequence[dict],
    runs: Sequence[dict],
    paper_bleu: Mapping[tuple, object],
    path_stem: str | Path,
    formats=("png",),
) -> list[Path]:
    """Left: this study's BLEU (bar: seed mean, dots: seeds, x: failed run). Right: the paper's table,
    paper_bleu[(depth, placement, warm-up)] = BLEU, "fail", or None (not reported)."""
    plt = setup()
    ours = _groups(table)
    paper = list(dict.fromkeys((m, w) for m, w, _ in ours))
    fig, axes = plt.subplots(
        1, 2, figsize=(13, 4.2), gridspec_kw=dict(width_ratios=[len(ours), max(len(paper), 1)])
    )
    w = 0.26
    by = {
        (r["model"], r["warmup"], float(r["lr"]), r["placement"]): r
        for r in table
        if float(r["alpha"]) == 1.0
    }
    first = {(m, wu): lr for m, wu, lr in reversed(ours)}  # one paper group per (model, warm-up)
    for ax, which, groups in zip(
        axes, ("ours", "paper"), (ours, [(m, wu, first[m, wu]) for m, wu in paper])
    ):
        for gi, (model, warm, lr) in enumerate(groups):
            for pi, p in enumerate(PLACEMENTS):
                r = by.get((model, warm, lr, p))
                x = gi + (pi - 1) * w
                if r is None and which == "ours":
                    ax.text(
                        x,
                        0.02,
                        "not run",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color=color(p),
                        rotation=90,
                    )
                    continue
                if which == "ours":
                    ax.bar(
                        x,
                        r["bleu_mean"],
                        w * 0.9,
                        color=color(p),
                        alpha=0.75,
                        label=label(p) if gi == 0 else None,
                    )
                    pts = [float(v) for v in str(r["bleu_per_seed"]).split()]
                    ax.plot([x] * len(pts), pts, "k.", ms=4)
                    fails = [
                        q
                        for q in runs
                        if f"E{q['depth']}D{q['depth']}" == model
                        and q["warmup"] == warm
                        and float(q["lr"]) == lr
                        and float(q["alpha"]) == 1.0
                        and q["placement"] == p
                        and q["failed"] == "yes"
                    ]
                    if fails:
                        ax.text(
                            x,
                            max(r["bleu_mean"], 0) + 0.5,
                            f"{len(fails)}\u00d7\nfail",
                            ha="center",
                            va="bottom",
                            fontsize=7,
                            color=color(p),
                        )
                else:
                    v = paper_bleu.get((int(model[1:].split("D")[0]), p, warm == "yes"))
                    if isinstance(v, (int, float)):
                        ax.bar(
                            x,
                            v,
                            w * 0.9,
                            color=color(p),
                            alpha=0.75,
                            label=label(p) if gi == 0 else None,
                        )
                        ax.text(
                            x,
                            v + 0.3,
                            f"{v:.1f}",
                            ha="center",
                            va="bottom",
                            fontsize=6.5,
                            rotation=90,
                        )
                    else:
                        ax.text(
                            x,
                            1.0,
                            "fail" if v == "fail" else "n/r",
                            ha="center",
                            va="bottom",
                            fontsize=7,
                            color=color(p),
                            rotation=90,
                        )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(
            [_group_label(m, wu, lr if which == "ours" else None) for m, wu, lr in groups],
            fontsize=8,
        )
        ax.set_ylabel("BLEU (sacrebleu)" if which == "ours" else "BLEU (paper)")
    axes[0].set_title(
        "This study: Pig Latin of pydoc sentences, d 64, held-out sentences,\n"
        "greedy decoding (bar: seed mean, dots: seeds)"
    )
    axes[1].set_title("ResiDual paper: IWSLT'14 De-En, d 256\n(n/r: not reported)")
    top = max([float(v) for r in table for v in str(r["bleu_per_seed"]).split()] + [1.0])
    axes[0].set_ylim(0, top * 1.25)
    axes[1].set_ylim(0, 42)
    axes[0].legend(frameon=False, fontsize=8, loc="upper right", ncol=3)
    fig.tight_layout()
    return save(fig, path_stem, formats)


def plot_curves(
    curves: Mapping[str, Sequence[dict]],
    specs: Mapping[str, dict],
    path_stem: str | Path,
    column: str = "heldout_loss",
    title: str = "",
    formats=("png",),
    levels: Mapping[str, float] | None = None,
    diverged: Iterable[str] = (),
) -> list[Path]:
    """`column` of the curve rows over training (held-out loss, or BLEU): one panel per model size
    and warm-up, one colour per placement, one line per seed; a cross where a run in `diverged`
    ended, and for a run in `levels` (one that hit its step cap) a dotted line from its last point
    to the level its fit extrapolates (only identified levels are passed)."""
    levels, diverged = levels or {}, set(diverged)
    plt = setup()
    depths = sorted({s["depth"] for s in specs.values()})
    warms = sorted({bool(specs[n]["warmup"]) for n in curves}, reverse=True)  # panels with runs
    fig, axes = plt.subplots(
        len(depths),
        len(warms),
        figsize=(max(7.0, 4.75 * len(warms)), 3.0 * len(depths)),
        squeeze=False,
        sharey=True,
    )
    for name, rows in curves.items():
        s = specs[name]
        ax = axes[depths.index(s["depth"])][warms.index(bool(s["warmup"]))]
        rows = [r for r in rows if np.isfinite(r[column])]
        steps = [r["step"] for r in rows]
        loss = [r[column] for r in rows]
        ax.plot(
            steps,
            loss,
            "-",
            color=color(s["placement"]),
            lw=1.3,
            alpha=0.85,
            marker=marker(s["placement"]),
            ms=3,
            label=label(s["placement"]) if s["seed"] == 0 else None,
        )
        if steps and name in diverged:
            ax.plot(steps[-1], loss[-1], "x", color=color(s["placement"]), ms=9)
        if steps and name in levels:
            end = steps[-1] * 1.12
            ax.plot(
                [steps[-1], end], [loss[-1], levels[name]], ":", color=color(s["placement"]), lw=1.2
            )
            ax.plot(end, levels[name], ">", color=color(s["placement"]), ms=4)
    for i, n in enumerate(depths):
        for j, warm in enumerate(warms):
            ax = axes[i][j]
            ax.set_title(f"E{n}D{n}, {'warm-up' if warm else 'no warm-up'}")
            ax.set_xlabel("step")
            if column == "heldout_loss":
                ax.set_yscale("log")
            if j == 0:
                ax.set_ylabel(
                    "held-out loss [nats/token]" if column == "heldout_loss" else "held-out BLEU"
                )
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path_stem, formats)


def plot_gradients(
    profiles: Mapping[str, Mapping[int, Mapping[int, float]]],
    ratios: Mapping[str, Mapping[str, Mapping[int, float]]],
    title: str,
    path_stem: str | Path,
    formats=("png",),
) -> list[Path]:
    """Per-block parameter-gradient norms during training.

    profiles: "<placement> <stack>" -> {step: {block: norm}} (one run per placement);
    ratios: run label -> {stack: {step: block 0 / last block norm}} (all runs of that depth).
    """
    plt = setup()
    stacks = ("encoder", "decoder")
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for i, stack in enumerate(stacks):
        for j, p in enumerate(PLACEMENTS):
            ax = axes[i][j]
            prof = profiles.get(f"{p} {stack}", {})
            steps = sorted(prof)
            for si, step in enumerate(steps):
                ks = sorted(prof[step])
                ax.plot(
                    ks,
                    [prof[step][k] for k in ks],
                    "-o",
                    ms=2.5,
                    lw=1.2,
                    color=cmap(si / max(len(steps) - 1, 1)),
                    label=f"step {step}",
                )
            ax.set_yscale("log")
            ax.set_title(f"{label(p)}, {stack}")
            ax.set_xlabel("block k")
            _integer_x(ax)
            if j == 0:
                ax.set_ylabel(r"$\|\partial L/\partial\theta_k\|$")
            if steps:
                ax.legend(frameon=False, fontsize=6.5)
        ax = axes[i][3]
        for name, per_stack in ratios.items():
            curve = per_stack.get(stack, {})
            steps = sorted(curve)
            p = name.split()[0]
            ax.plot(
                steps,
                [curve[s] for s in steps],
                "--" if "no warm-up" in name else "-",
                color=color(p),
                lw=1.1,
                alpha=0.85,
                label=name,
            )
        ax.axhline(1.0, color="black", lw=0.7, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("block 0 / last block")
        ax.set_title(f"{stack}: first/last block gradient")
        if i == 0:
            ax.legend(frameon=False, fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path_stem, formats)


def plot_influence(
    profiles: Mapping[str, Mapping[str, Mapping[int, float]]],
    title: str,
    path_stem: str | Path,
    formats=("png",),
) -> list[Path]:
    """Block influence 1 - cos(h_{k-1}, h_k) per block: "<placement>" -> {"<stack> <stream>": {block: value}}."""
    plt = setup()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.7), squeeze=False)
    for j, stack in enumerate(("encoder", "decoder")):
        ax = axes[0][j]
        for p, per in profiles.items():
            for key, prof in per.items():
                st, stream = key.split()
                if st != stack:
                    continue
                ks = sorted(prof)
                name = label(p) + (f", {stream} stream" if p == "residual" else "")
                ax.plot(
                    ks,
                    [prof[k] for k in ks],
                    "-" if stream == "x" else ":",
                    marker=marker(p),
                    ms=3,
                    color=color(p),
                    label=name,
                )
        ax.set_yscale("log")
        ax.set_xlabel("block k")
        _integer_x(ax)
        ax.set_ylabel(r"block influence $1-\cos(h_{k-1},h_k)$")
        ax.set_title(stack)
        ax.legend(frameon=False, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path_stem, formats)


def plot_streams(
    panels: Mapping[str, Sequence[dict]], path_stem: str | Path, formats=("png",)
) -> list[Path]:
    """ResiDual's two streams over training, one column per run ("title" -> stream rows of its final stack).

    Row 1: gradient through the x stream alone (the Post-LN half) per block, at each evaluation step,
    and the total gradient reaching the d stream at the last step (black, dashed): the same at every
    block by construction (nothing reads d before the output, so dL/dd_k = dL/dd_N), not a finding.
    Row 2: RMS norm of each stream's term in the output, alpha*x_N and LN_f(d_N), over training.
    Row 3: held-out loss increase when that term is mean-ablated.
    """
    if not panels:
        return []
    plt = setup()
    n = len(panels)
    fig, axes = plt.subplots(3, n, figsize=(4.3 * n, 9.0), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for j, (title, rows) in enumerate(panels.items()):
        q = defaultdict(dict)
        for r in rows:
            q[r["quantity"]].setdefault(int(r["step"]), {})[int(r["layer"])] = float(r["value"])
        ax = axes[0][j]
        steps = sorted(q["grad_x_path"])
        for si, step in enumerate(steps):
            prof = q["grad_x_path"][step]
            ks = sorted(prof)
            ax.plot(
                ks,
                [prof[k] for k in ks],
                "-",
                lw=1.1,
                color=cmap(si / max(len(steps) - 1, 1)),
                label=f"x path, step {step}"
                if si in (0, len(steps) - 1) or len(steps) <= 4
                else None,
            )
        if steps:
            prof = q["grad_d_total"][steps[-1]]
            ks = sorted(prof)
            ax.plot(
                ks,
                [prof[k] for k in ks],
                "k--",
                lw=1.2,
                label=f"d stream (total), step {steps[-1]}: flat by construction (dL/dd_k = dL/dd_N)",
            )
        ax.set_yscale("log")
        ax.set_xlabel("block k (output of)")
        _integer_x(ax)
        ax.set_ylabel(r"RMS $\|\partial L/\partial h_k\|$")
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=6.5)
        ax = axes[1][j]
        for qty, name, st in (
            ("out_rms_x", r"$\alpha\,x_N$", "-"),
            ("out_rms_d", r"LN$_f(d_N)$", "--"),
        ):
            series = {s: v[-1] for s, v in q[qty].items()}
            ss = sorted(series)
            ax.plot(
                ss,
                [series[s] for s in ss],
                st,
                color=color("residual"),
                marker="o",
                ms=3,
                label=name,
            )
        ax.set_xlabel("step")
        ax.set_ylabel("RMS norm per token")
        ax.legend(frameon=False, fontsize=8)
        ax = axes[2][j]
        for qty, name, st in (
            ("ablate_x", r"mean-ablate $\alpha\,x_N$", "-"),
            ("ablate_d", r"mean-ablate LN$_f(d_N)$", "--"),
        ):
            series = {s: v[-1] for s, v in q[qty].items()}
            ss = sorted(series)
            ax.plot(ss, [series[s] for s in ss], st, color="black", marker="o", ms=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss increase [nats]")
        ax.axhline(0.0, color="black", lw=0.6, ls=":")
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(
        "ResiDual's two streams during training: x (Post-LN half) and d (Pre-LN half)", fontsize=10
    )
    fig.tight_layout()
    return save(fig, path_stem, formats)
