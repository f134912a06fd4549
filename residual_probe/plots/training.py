"""Loss curves of training runs: training loss (smoothed) and held-out loss per run."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from .style import color, save, setup


def read_loss_csv(path: str | Path) -> dict[str, np.ndarray]:
    """loss.csv as arrays: step, train_loss, and (val_step, val_loss) where evaluated."""
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    step = np.array([int(r["step"]) for r in rows])
    train = np.array([float(r["train_loss"]) for r in rows])
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    return {"step": step, "train_loss": train,
            "val_step": np.array([s for s, _ in val]), "val_loss": np.array([v for _, v in val])}


def ema(x: np.ndarray, beta: float = 0.9) -> np.ndarray:
    out, m = np.empty_like(x), x[0] if len(x) else 0.0
    for i, v in enumerate(x):
        m = beta * m + (1 - beta) * v if math.isfinite(v) else v
        out[i] = m
    return out


def plot_losses(runs: Mapping[str, str | Path], path_stem: str | Path, formats=("png",), title: str = "") -> list[Path]:
    """One line per run: label -> loss.csv. The label's first word picks the placement colour."""
    plt = setup()
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    top = 0.0
    for i, (name, path) in enumerate(runs.items()):
        d = read_loss_csv(path)
        placement = name.split()[0]
        style = "-" if "no warm-up" not in name else "--"
        if len(d["step"]):
            ax_t.plot(d["step"], ema(d["train_loss"]), style, color=color(placement), label=name, lw=1.4)
            finite = d["train_loss"][np.isfinite(d["train_loss"])]
            top = max(top, float(finite[:5].max()) if len(finite) else 0.0)
            if len(d["step"]) and not math.isfinite(d["train_loss"][-1]):
                ax_t.plot(d["step"][-1], top, "x", color=color(placement), ms=9)
        if len(d["val_step"]):
            ax_v.plot(d["val_step"], d["val_loss"], style + "o", color=color(placement), label=name, lw=1.4, ms=3)
    for ax, what in ((ax_t, "training loss (EMA 0.9)"), (ax_v, "held-out loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{what} [nats/byte]")
        if top:
            ax.set_ylim(top=top * 1.05)
    ax_t.set_title(title or "training")
    ax_v.set_title("held-out (last 5% of the corpus)")
    ax_v.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return save(fig, path_stem, formats)
