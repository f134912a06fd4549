"""One look for every figure: placement colours, paper-sized fonts, atomic multi-format saving (output.write_atomic)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..output import write_atomic

# A fixed colour per placement so that a reader can compare figures at a glance.
PLACEMENT_COLORS = {
    "post-ln": "#d62728",
    "pre-ln": "#1f77b4",
    "residual": "#2ca02c",
    "deepnorm": "#9467bd",
    "sandwich": "#8c564b",
    "peri-ln": "#e377c2",
    "b2t": "#7f7f7f",
    "mix-ln": "#bcbd22",
    "lns": "#17becf",
    "rezero": "#ff7f0e",
}
# Distinct markers too: Post-LN and ResiDual's x stream coincide at initialization (same weights,
# same x <- LN(x + F(x))), and markers keep both visible where the lines overlap.
PLACEMENT_MARKERS = {"post-ln": "o", "pre-ln": "s", "residual": "^"}
PLACEMENT_LABELS = {"residual": "ResiDual (Pre-Post-LN)", "post-ln": "Post-LN", "pre-ln": "Pre-LN"}


# Colours for placements registered later (models.PLACEMENTS), in registration order.
SPARE_COLORS = (
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
)


def color(name: str) -> str:
    """The placement's colour: fixed for the built-in ones, a spare one for any other registered
    placement (so a new placement is told apart in every figure), grey for anything else."""
    if name in PLACEMENT_COLORS:
        return PLACEMENT_COLORS[name]
    from ..models import PLACEMENTS

    others = [p for p in PLACEMENTS if p not in PLACEMENT_COLORS]
    return SPARE_COLORS[others.index(name) % len(SPARE_COLORS)] if name in others else "#333333"


def marker(name: str) -> str:
    return PLACEMENT_MARKERS.get(name, "d")


def label(name: str) -> str:
    return PLACEMENT_LABELS.get(name, name)


def setup():
    """Import matplotlib with a non-interactive backend and the paper style; returns pyplot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "savefig.bbox": "tight",
        }
    )
    return plt


def save(fig, path_stem: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Save `fig` as path_stem.<fmt> for each format, each file written atomically; closes `fig`."""
    import matplotlib.pyplot as plt

    stem = Path(path_stem)
    try:
        return [
            write_atomic(
                stem.with_suffix(f".{fmt}"), lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt)
            )
            for fmt in formats
        ]
    finally:
        plt.close(fig)


FORMATS = ("png", "pdf", "svg")
