"""Figures of the `bounds` job: theory (dashed) against measurement (solid, seed mean and range).

Each function draws only what it is given (arrays from `jobs.bounds` / `analysis.checks`);
nothing here computes a metric or decides an agreement. One figure per statement; settings
(Xiong's W^Q = W^K = 0, default fairseq) side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..models.placements import PAPER_PLACEMENTS
from .style import color, label, save, setup

SETTING_TITLES = {"xiong": "Xiong setting (W^Q = W^K = 0)", "fairseq": "default (fairseq) init"}


def _settings(keys) -> list[str]:
    return [s for s in SETTING_TITLES if any(k[0] == s for k in keys)]


def _band(ax, x, table, c, lab):
    """Geometric seed mean (line) and min..max over seeds (shade) of table (seeds, len(x)), as
    `analysis.curves.band` defines them."""
    from ..analysis.curves import band

    b = band(table)
    ax.plot(x, b["center"], color=c, label=lab, lw=1.6)
    if b["seeds"] > 1:
        ax.fill_between(x, b["low"], b["high"], color=c, alpha=0.2, lw=0)


def plot_lemma2(data: dict, depth: int, path_stem: str | Path, formats=("png",)) -> list[Path]:
    """data[setting] = {"title", "post": {"values": (seeds, N), "predicted"}, "pre": {"norm_sq": (seeds, N),
    "v0", "low", "high"}}: one panel per setting, Post-LN at its last LN's input, Pre-LN on the stream."""
    plt = setup()
    keys = list(data)
    fig, axes = plt.subplots(
        1, len(keys), figsize=(5 * len(keys), 3.9), squeeze=False, layout="constrained"
    )
    ell = np.arange(1, depth + 1)
    for ax, key in zip(axes[0], keys):
        d = data[key]
        pre, post = d["pre"], d["post"]
        ax.fill_between(
            ell,
            pre["low"],
            pre["high"],
            color=color("pre-ln"),
            alpha=0.15,
            label="Pre-LN predicted band"
            + (" (1 + l/2)..(1 + 3l/2)" if key == "lemma" else " (derived)"),
        )
        ax.plot(
            ell,
            pre["norm_sq"].mean(0),
            color=color("pre-ln"),
            lw=1.6,
            marker=".",
            ms=3,
            label="Pre-LN measured: stream after block l",
        )
        ax.plot(
            ell,
            post["values"].mean(0),
            color=color("post-ln"),
            lw=1.6,
            marker=".",
            ms=3,
            label="Post-LN measured: input of block l's last LN",
        )
        ax.axhline(
            post["predicted"],
            ls="--",
            color="k",
            lw=0.9,
            label=f"Post-LN predicted {post['predicted']:.3g}"
            + (" (3/2)" if key == "lemma" else ""),
        )
        ax.set(
            xlabel="block l", ylabel="E||x||^2 / d  (per dimension)", title=d["title"], yscale="log"
        )
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Xiong et al. 2020, Lemma 2 at initialization, depth {depth}: the lemma's setting "
        "(Xiong init, FFN = d) and the default sizes"
    )
    return save(fig, path_stem, formats)


def plot_theorem1(data: dict, path_stem: str | Path, formats=("png",)) -> list[Path]:
    """data[(setting, placement)] = {"depths", "w2": (seeds, len(depths)), "predicted", "slope"}."""
    from matplotlib.ticker import NullLocator

    plt = setup()
    settings = _settings(data)
    fig, axes = plt.subplots(
        1, len(settings), figsize=(5 * len(settings), 3.8), squeeze=False, layout="constrained"
    )
    for ax, s in zip(axes[0], settings):
        for p in ("post-ln", "pre-ln"):
            d = data[(s, p)]
            _band(
                ax, d["depths"], d["w2"], color(p), f"{label(p)} measured (slope {d['slope']:.2f})"
            )
            ax.plot(d["depths"], d["w2"].T, ".", color=color(p), ms=3, alpha=0.5)  # every seed
            pred = "L^0" if p == "post-ln" else "L^-1/2"
            ax.plot(
                d["depths"],
                d["predicted"],
                "--",
                color=color(p),
                label=f"Theorem 1: {pred} (constant fitted)",
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="depth L (blocks)",
            ylabel="||dL/dW2|| of the last block (Frobenius)",
            title=SETTING_TITLES[s],
        )
        ax.xaxis.set_minor_locator(NullLocator())  # depth ticks only at the measured depths
        ax.set_xticks(
            data[(s, "pre-ln")]["depths"], [str(int(x)) for x in data[(s, "pre-ln")]["depths"]]
        )
        ax.legend(fontsize=7)
    fig.suptitle(
        "Xiong et al. 2020, Theorem 1: last block's FFN W2 gradient against depth, at initialization"
    )
    return save(fig, path_stem, formats)


def plot_residual_gradient(data: dict, path_stem: str | Path, formats=("png",)) -> list[Path]:
    """data[(setting, stack, placement)] = {"grads": (seeds, N), "predicted": (N,), "fit": DecayFit}."""
    plt = setup()
    settings = _settings(data)
    stacks = ("encoder", "decoder")
    fig, axes = plt.subplots(
        len(settings), 2, figsize=(10, 5.4 * len(settings)), squeeze=False, layout="constrained"
    )
    for i, s in enumerate(settings):
        for j, stack in enumerate(stacks):
            ax = axes[i][j]
            for p in PAPER_PLACEMENTS:
                d = data[(s, stack, p)]
                n = d["grads"].shape[1]
                _band(
                    ax,
                    np.arange(n),
                    d["grads"],
                    color(p),
                    f"{label(p)} ({d['fit'].rate:.3g}/block)",
                )
                if p != "pre-ln":
                    what = (
                        "paper's curve $C\\,2^{-m/2} e^{\\sqrt{m}}$, C fitted"
                        if p == "post-ln"
                        else "dual-path floor (flat)"
                    )
                    ax.plot(
                        np.arange(n),
                        d["predicted"],
                        "--",
                        color=color(p),
                        label=f"predicted: {what}",
                    )
            ax.set(
                yscale="log",
                xlabel="block k (0 = input side)",
                ylabel="||dL/dtheta_k|| (block parameters)",
                title=f"{stack} of seq2seq, {SETTING_TITLES[s]}",
            )
            grads = [data[(s, stack, p)]["grads"] for p in PAPER_PLACEMENTS]
            lo, hi = min(np.nanmin(g) for g in grads), max(np.nanmax(g) for g in grads)
            # the axes follow the measurements: the fitted paper curve, steeper than the data, leaves
            # the frame at both ends instead of squeezing the data into a few decades
            ax.set_ylim(lo / 10, hi * 10)
            # below the panel: the curves cross every corner of it
            ax.legend(
                fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False
            )
    fig.suptitle(
        "ResiDual (Xie et al. 2023): per-block gradient norms at initialization "
        "(rate = factor per block toward the input)"
    )
    return save(fig, path_stem, formats)


def plot_collapse(toy: dict, model: dict, path_stem: str | Path, formats=("png",)) -> list[Path]:
    """toy[placement] = {"mc": {metric: (K,)}, "pred": {metric: (K,)}}; model[(setting, placement)] = (seeds, N)."""
    plt = setup()
    settings = _settings(model)
    fig, axes = plt.subplots(
        1,
        2 + len(settings),
        figsize=(4.4 * (2 + len(settings)), 3.8),
        squeeze=False,
        layout="constrained",
    )
    axes = axes[0]
    for p, d in toy.items():
        k = np.arange(1, len(d["pred"]["ln_update"]) + 1)
        axes[0].plot(
            k, d["mc"]["cos_adjacent"], color=color(p), lw=1.6, label=f"{label(p)} Monte-Carlo"
        )
        axes[0].plot(k, d["pred"]["cos_adjacent"], "--", color="k", lw=0.8)
        axes[1].plot(
            k, d["mc"]["ln_update"], color=color(p), lw=1.6, label=f"{label(p)} Monte-Carlo"
        )
        axes[1].plot(k, d["pred"]["ln_update"], "--", color="k", lw=0.8)
    axes[0].plot([], [], "--", color="k", lw=0.8, label="closed form")
    axes[1].plot([], [], "--", color="k", lw=0.8, label="closed form")
    axes[0].set(
        xlabel="block k",
        ylabel="cos(x_k, x_{k+1})",
        title="toy model: adjacent cosine",
        xscale="log",
    )
    axes[1].set(
        xlabel="block k",
        ylabel="E|LN(x_{k+1}) - LN(x_k)| per coordinate",
        title="toy model: normalized update",
        xscale="log",
        yscale="log",
    )
    for ax, s in zip(axes[2:], settings):
        for p in PAPER_PLACEMENTS:
            t = model[(s, p)]["ln_update"]
            _band(
                ax,
                np.arange(1, t.shape[1] + 1),
                t,
                color(p),
                label(p) + (" x stream (= Post-LN's at init)" if p == "residual" else ""),
            )
        pre = model[(s, "pre-ln")]
        k = np.arange(1, pre["ln_update"].shape[1] + 1)
        ax.plot(
            k[1:],
            pre["inverse_sqrt"][1:],
            "--",
            color=color("pre-ln"),
            lw=0.9,
            label="k^-1/2 (toy asymptote, through block 2)",
        )
        ax.plot(
            k[1:],
            pre["closed_form"][1:],
            ":",
            color="k",
            lw=1.2,
            label="Pre-LN closed form with its own update sizes r_k",
        )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="block k",
            ylabel="E|LN(h_k) - LN(h_{k-1})|",
            title=f"model: {SETTING_TITLES[s]}",
        )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(
        "ResiDual collapse result: toy model (independent Gaussian updates, d -> inf) and reference models at init"
    )
    return save(fig, path_stem, formats)


def plot_adam(
    data: dict, lr: float, eps: float, closed_form: tuple, path_stem: str | Path, formats=("png",)
) -> list[Path]:
    """data[(setting, stack)] = {"grad_rms", "kappa_over_paper", ...}: (seeds, N) each, Post-LN seq2seq.

    x: a block's gradient RMS over eps; y: torch Adam's measured kappa over the paper's
    alpha sqrt(n)/eps; closed_form (rms/eps grid, ratio) for a block of Gaussian gradients beside it
    (`analysis.theory.adam_condition_curve`)."""
    plt = setup()
    fig, ax = plt.subplots(figsize=(6, 4.2), layout="constrained")
    markers = {"xiong": "o", "fairseq": "s"}
    for (setting, stack), t in sorted(data.items()):
        x = t["grad_rms"].ravel() / eps
        y = t["kappa_over_paper"].ravel()
        c = color("post-ln") if stack == "decoder" else color("pre-ln")
        ax.plot(
            x,
            y,
            markers.get(setting, "o"),
            color=c,
            ms=3.5,
            alpha=0.7,
            mfc="none" if setting == "xiong" else c,
            label=f"{stack}, {setting} init (each block, each seed)",
        )
    grid, ratio = closed_form
    ax.plot(grid, ratio, "-", color="k", lw=1, label="closed form, Gaussian gradients")
    ax.axhline(1.0, ls="--", color=color("residual"), lw=1, label="paper: alpha sqrt(n) / eps")
    ax.axvline(1.0, ls=":", color="gray", lw=1, label="rms(g) = eps")
    ax.axvspan(
        grid[0], 1e-3, color=color("residual"), alpha=0.08, lw=0, label="checked: rms(g) < eps/1000"
    )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="block gradient RMS / eps",
        ylabel="kappa / (alpha sqrt(n) / eps)",
        title=f"ResiDual's Adam argument on Post-LN seq2seq at init (alpha {lr:g}, eps {eps:g})",
    )
    ax.legend(fontsize=7)
    return save(fig, path_stem, formats)
