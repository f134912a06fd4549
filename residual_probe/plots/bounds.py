"""Figures of the `bounds` job: theory (dashed) against measurement (solid, seed mean and range).

Each function draws only what it is given (arrays from `jobs.bounds`, `analysis.checks` and
`analysis.summary.band`: seed geometric mean and min..max); nothing here computes a metric, a
theory curve or an agreement. One figure per statement; settings
(Xiong's W^Q = W^K = 0, default fairseq) side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .style import color, label, save, setup

SETTING_TITLES = {"xiong": "Xiong setting (W^Q = W^K = 0)", "fairseq": "default (fairseq) init"}


def _settings(keys) -> list[str]:
    return [s for s in SETTING_TITLES if any(k[0] == s for k in keys)]


def _band(ax, x, band: dict, c, lab):
    """A seed band (analysis.summary.band): center as a line, low..high shaded when seeds > 1."""
    ax.plot(x, band["center"], color=c, label=lab, lw=1.6)
    if band["seeds"] > 1:
        ax.fill_between(x, band["low"], band["high"], color=c, alpha=0.2, lw=0)


def plot_lemma2(data: dict, depth: int, path_stem: str | Path, formats=("png",)) -> list[Path]:
    """data[(setting, placement)] = {"mean": (N,) seed mean of E||x_l||^2/d, "theory": Lemma 2's curve,
    (N,) for post-ln, (lower, upper) band for pre-ln}."""
    plt = setup()
    settings = _settings(data)
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.8), squeeze=False, layout="constrained")
    l = np.arange(1, depth + 1)
    for ax, s in zip(axes[0], settings):
        for p in ("post-ln", "pre-ln"):
            d = data[(s, p)]
            ax.plot(l, d["mean"], color=color(p), label=f"{label(p)} measured", lw=1.6, marker=".", ms=3)
        lo, hi = data[(s, "pre-ln")]["theory"]
        ax.fill_between(l, lo, hi, color=color("pre-ln"), alpha=0.12, label="Lemma 2 Pre-LN band v0 + [1/2, 3/2] l")
        ax.plot(l, data[(s, "post-ln")]["theory"], "--", color="k", lw=0.9, zorder=3, label="Lemma 2 Post-LN (flat, 1 after LN)")
        ax.set(xlabel="block l (output of block l)", ylabel="E||x_l||^2 / d  (per dimension)", title=SETTING_TITLES[s],
               yscale="log")
        ax.legend(fontsize=7)
    fig.suptitle(f"Xiong et al. 2020, Lemma 2: hidden-state norm per block at initialization, depth {depth}")
    return save(fig, path_stem, formats)


def plot_theorem1(data: dict, path_stem: str | Path, formats=("png",)) -> list[Path]:
    """data[(setting, placement)] = {"depths", "w2": (seeds, len(depths)), "band", "predicted", "slope"}."""
    from matplotlib.ticker import NullLocator

    plt = setup()
    settings = _settings(data)
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 3.8), squeeze=False, layout="constrained")
    for ax, s in zip(axes[0], settings):
        for p in ("post-ln", "pre-ln"):
            d = data[(s, p)]
            _band(ax, d["depths"], d["band"], color(p), f"{label(p)} measured (slope {d['slope']:.2f})")
            ax.plot(d["depths"], d["w2"].T, ".", color=color(p), ms=3, alpha=0.5)  # every seed
            pred = "L^0" if p == "post-ln" else "L^-1/2"
            ax.plot(d["depths"], d["predicted"], "--", color=color(p), label=f"Theorem 1: {pred} (constant fitted)")
        ax.set(xscale="log", yscale="log", xlabel="depth L (blocks)", ylabel="||dL/dW2|| of the last block (Frobenius)",
               title=SETTING_TITLES[s])
        ax.xaxis.set_minor_locator(NullLocator())  # depth ticks only at the measured depths
        ax.set_xticks(data[(s, "pre-ln")]["depths"], [str(int(x)) for x in data[(s, "pre-ln")]["depths"]])
        ax.legend(fontsize=7)
    fig.suptitle("Xiong et al. 2020, Theorem 1: last block's FFN W2 gradient against depth, at initialization")
    return save(fig, path_stem, formats)


def plot_residual_gradient(data: dict, path_stem: str | Path, formats=("png",)) -> list[Path]:
    """data[(setting, stack, placement)] = {"band": seed band over N blocks, "predicted": (N,), "fit": DecayFit}."""
    plt = setup()
    settings = _settings(data)
    stacks = ("encoder", "decoder")
    fig, axes = plt.subplots(len(settings), 2, figsize=(10, 3.6 * len(settings)), squeeze=False, layout="constrained")
    for i, s in enumerate(settings):
        for j, stack in enumerate(stacks):
            ax = axes[i][j]
            for p in ("post-ln", "pre-ln", "residual"):
                d = data[(s, stack, p)]
                n = len(d["band"]["center"])
                _band(ax, np.arange(n), d["band"], color(p), f"{label(p)} ({d['fit'].rate:.3g}/block)")
                if p != "pre-ln":
                    what = "Post-LN path (1/2)^(m/2) e^sqrt(m)" if p == "post-ln" else "dual-path floor (flat)"
                    ax.plot(np.arange(n), d["predicted"], "--", color=color(p), label=f"predicted: {what}")
            ax.set(yscale="log", xlabel="block k (0 = input side)", ylabel="||dL/dtheta_k|| (block parameters)",
                   title=f"{stack} of seq2seq, {SETTING_TITLES[s]}")
            lo = min(np.nanmin(data[(s, stack, p)]["band"]["low"]) for p in ("post-ln", "pre-ln", "residual"))
            ax.set_ylim(bottom=max(lo / 10, ax.get_ylim()[0]))  # the predicted decay may fall far below
            ax.legend(fontsize=7)
    fig.suptitle("ResiDual (Xie et al. 2023): per-block gradient norms at initialization "
                 "(rate = factor per block toward the input)")
    return save(fig, path_stem, formats)


def plot_collapse(toy: dict, model: dict, path_stem: str | Path, formats=("png",)) -> list[Path]:
    """toy[placement] = {"mc": {metric: (K,)}, "pred": {metric: (K,)}};
    model[(setting, placement)] = {"band": seed band of ln_update over N blocks, "reference": k^-1/2 (pre-ln)}."""
    plt = setup()
    settings = _settings(model)
    fig, axes = plt.subplots(1, 2 + len(settings), figsize=(4.4 * (2 + len(settings)), 3.8), squeeze=False, layout="constrained")
    axes = axes[0]
    for p, d in toy.items():
        k = np.arange(1, len(d["pred"]["ln_update"]) + 1)
        axes[0].plot(k, d["mc"]["cos_adjacent"], color=color(p), lw=1.6, label=f"{label(p)} Monte-Carlo")
        axes[0].plot(k, d["pred"]["cos_adjacent"], "--", color="k", lw=0.8)
        axes[1].plot(k, d["mc"]["ln_update"], color=color(p), lw=1.6, label=f"{label(p)} Monte-Carlo")
        axes[1].plot(k, d["pred"]["ln_update"], "--", color="k", lw=0.8)
    axes[0].plot([], [], "--", color="k", lw=0.8, label="closed form")
    axes[1].plot([], [], "--", color="k", lw=0.8, label="closed form")
    axes[0].set(xlabel="block k", ylabel="cos(x_k, x_{k+1})", title="toy model: adjacent cosine", xscale="log")
    axes[1].set(xlabel="block k", ylabel="E|LN(x_{k+1}) - LN(x_k)| per coordinate",
                title="toy model: normalized update", xscale="log", yscale="log")
    for ax, s in zip(axes[2:], settings):
        for p in ("post-ln", "pre-ln", "residual"):
            b = model[(s, p)]["band"]
            _band(ax, np.arange(1, len(b["center"]) + 1), b, color(p),
                  label(p) + (" x stream (= Post-LN's at init)" if p == "residual" else ""))
        ref = model[(s, "pre-ln")]["reference"]
        k = np.arange(1, len(ref) + 1)
        ax.plot(k[1:], ref[1:], "--", color=color("pre-ln"), label="k^-1/2 (shape, through block 2)")
        ax.set(xscale="log", yscale="log", xlabel="block k", ylabel="E|LN(h_k) - LN(h_{k-1})|",
               title=f"model: {SETTING_TITLES[s]}")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("ResiDual collapse result: toy model (independent Gaussian updates, d -> inf) and reference models at init")
    return save(fig, path_stem, formats)


def plot_adam(g_healthy: float, g_small, measured, predicted, eps: float, path_stem: str | Path,
              formats=("png",)) -> list[Path]:
    """Adam's step-size ratio between a vanishing coordinate and a healthy one, against theory."""
    plt = setup()
    fig, ax = plt.subplots(figsize=(5.2, 3.8), layout="constrained")
    ax.plot(g_small, measured, "o", color=color("post-ln"), label="torch Adam (3000 steps, betas 0.9/0.999)")
    ax.plot(g_small, predicted, "-", color="k", lw=1, label="(g_healthy + eps) / (g_small + eps)")
    ax.axhline(g_healthy / eps, ls="--", color=color("residual"), label="alpha sqrt(d) / eps  (g = 0)")
    ax.axvline(eps, ls=":", color="gray", label=f"eps = {eps:g}")
    ax.set(xscale="log", yscale="log", xlabel="gradient RMS of the vanishing coordinate g_small",
           ylabel="effective step ratio (condition number)",
           title=f"ResiDual's Adam argument (g_healthy = {g_healthy:g})")
    ax.legend(fontsize=7)
    return save(fig, path_stem, formats)
