"""Collapse per layer: theory and Monte-Carlo of the toy model beside measured models."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .style import color, label, marker, save, setup

SOURCES = ("toy model", "model at init", "trained (warm-up)")
YLABELS = {
    "cos_adjacent": r"adjacent cosine $\cos(h_{k-1}, h_k)$",
    "ln_update": r"normalized update $E|LN(h_k) - LN(h_{k-1})|$",
}


def plot_collapse_theory(
    rows: Sequence[dict], path_stem: str | Path, formats=("png",)
) -> list[Path]:
    """rows: source (theory / monte-carlo / model at init / trained ...), placement, layer, metric, value."""
    plt = setup()
    columns = [s for s in SOURCES if s == "toy model" or any(r["source"] == s for r in rows)]
    metrics = list(YLABELS)
    fig, axes = plt.subplots(
        len(metrics), len(columns), figsize=(4.2 * len(columns), 3.3 * len(metrics)), squeeze=False
    )
    placements = list(dict.fromkeys(r["placement"] for r in rows))
    for i, m in enumerate(metrics):
        for j, col in enumerate(columns):
            ax = axes[i, j]
            sources = (
                ("theory", "monte-carlo")
                if col == "toy model"
                else (col, col + ": closed form with its r_k")
                if col == "model at init"
                else (col,)
            )
            for p in placements:
                for src in sources:
                    sel = sorted(
                        (r["layer"], r["value"])
                        for r in rows
                        if r["source"] == src and r["placement"] == p and r["metric"] == m
                    )
                    if not sel:
                        continue
                    ks, vs = zip(*sel)
                    ks = [k + 1 for k in ks]  # 1-based block index, as in the paper's k
                    if src == "monte-carlo":
                        ax.plot(ks, vs, "o", ms=2.5, color=color(p), alpha=0.6)
                    elif src.endswith("closed form with its r_k"):
                        ax.plot(
                            ks,
                            vs,
                            ":",
                            color="k",
                            lw=1.4,
                            label=label(p) + ": closed form with its own r_k",
                        )
                    elif src == "theory":
                        ax.plot(
                            ks, vs, "--", color=color(p), lw=1.5, label=label(p) + " (closed form)"
                        )
                    else:
                        filled = (
                            p != "residual"
                        )  # hollow markers let coinciding curves show through
                        ax.plot(
                            ks,
                            vs,
                            "-",
                            color=color(p),
                            lw=1.3,
                            marker=marker(p),
                            ms=5 if filled else 7,
                            mfc=color(p) if filled else "none",
                            label=label(p),
                        )
            ax.set_xlabel("block k (1 = first)")
            ax.set_ylabel(YLABELS[m])
            ax.set_title(
                col
                + (
                    ": closed form (dashed) vs Monte-Carlo (dots);\nPost-LN = ResiDual x stream"
                    if col == "toy model"
                    else " (ResiDual: x stream)"
                ),
                fontsize=9,
            )
            if m == "ln_update":
                ax.set_yscale("log")
            if i == 0:
                ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return save(fig, path_stem, formats)
