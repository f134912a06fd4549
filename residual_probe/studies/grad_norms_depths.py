"""Per-layer gradient norms at initialization, post-ln / pre-ln / residual, depths 6 to 48.

The analogue of the ResiDual paper's Fig. 2(a), for an encoder-decoder (the paper's translation
setting, both stacks) and a decoder-only LM. Writes figures/grad_norms_depths.{png,csv}.

Checks: where Post-LN's gradient vanishes toward the input (first/last block ratio), whether it
grows with depth, whether ResiDual keeps a floor, and whether Pre-LN's lower blocks get larger
gradients than its upper ones.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..analysis.checks import Check, agreement, fmt
from ..analysis.curves import first_over_last, layer_table, seed_band
from ..analysis.verdicts import VANISHING_RATIO, is_vanishing
from ..jobs.grad_norms import GradNormsSpec, record_run
from ..models.placements import PAPER_PLACEMENTS as PLACEMENTS
from ..output import write_csv
from ..plots.grad_norms import plot_depth_grid

SETTINGS = {
    "seq2seq encoder": ("seq2seq", "encoder"),
    "seq2seq decoder": ("seq2seq", "decoder"),
    "decoder-only LM": ("decoder", "decoder"),
}


def depth_rows(quick: bool):
    depths = (6, 12, 24) if quick else (6, 12, 24, 48)
    size = (
        dict(d_model=64, heads=4, ffn=256, seeds=2)
        if quick
        else dict(d_model=256, heads=4, ffn=1024, seeds=3)
    )
    rows = []
    for arch in ("seq2seq", "decoder"):
        for depth in depths:
            spec = GradNormsSpec(
                placements=PLACEMENTS, arch=arch, depth=depth, batch=8, seq_len=32, **size
            )
            for p in PLACEMENTS:
                for seed in range(spec.seeds):
                    for r in record_run(spec, p, seed)[0]:
                        if r["sublayer"] == "block":
                            rows.append({**r, "arch": arch, "depth": depth})
    return rows, depths


def run(out: Path, quick: bool = False) -> list[Check]:
    rows, depths = depth_rows(quick)
    write_csv(
        out / "grad_norms_depths.csv",
        rows,
        (
            "arch",
            "depth",
            "placement",
            "seed",
            "step",
            "stack",
            "layer",
            "sublayer",
            "param_grad_norm",
        ),
    )
    df = pd.DataFrame(rows)
    panels, r = {}, {}
    for setting, (arch, stack) in SETTINGS.items():
        for depth in depths:
            sel = df[(df["arch"] == arch) & (df["stack"] == stack) & (df["depth"] == depth)]
            panels[(setting, depth)] = seed_band(sel, by=["placement"])
            for p, g in sel.groupby("placement"):
                r[setting, p, depth] = first_over_last(layer_table(g))  # geometric mean over seeds
    plot_depth_grid(
        panels,
        out / "grad_norms_depths",
        title="Per-block gradient norm at initialization (fairseq init, synthetic data)",
    )

    N, n0 = depths[-1], depths[0]

    def ratio_check(statement, setting, placement, predicted, ok):
        return Check(
            statement,
            f"fairseq init/{setting}/N={N}",
            placement,
            predicted,
            f"first/last = {fmt(r[setting, placement, N])}",
            agreement(ok),
        )

    post_dec = r["seq2seq decoder", "post-ln", N]
    checks = [
        ratio_check(
            "Post-LN gradients vanish toward the input",
            "seq2seq decoder",
            "post-ln",
            f"first/last << 1 (< {VANISHING_RATIO:g})",
            is_vanishing(post_dec),
        ),
        Check(
            "Post-LN vanishing grows with depth",
            "fairseq init/seq2seq decoder",
            "post-ln",
            f"first/last at N={N} < at N={n0}",
            f"{fmt(post_dec)} vs {fmt(r['seq2seq decoder', 'post-ln', n0])}",
            agreement(post_dec < r["seq2seq decoder", "post-ln", n0]),
        ),
        ratio_check(
            "Post-LN gradients vanish toward the input",
            "seq2seq encoder",
            "post-ln",
            f"first/last << 1 (< {VANISHING_RATIO:g})",
            is_vanishing(r["seq2seq encoder", "post-ln", N]),
        ),
        ratio_check(
            "Post-LN gradients vanish toward the input",
            "decoder-only LM",
            "post-ln",
            f"first/last << 1 (< {VANISHING_RATIO:g})",
            is_vanishing(r["decoder-only LM", "post-ln", N]),
        ),
        ratio_check(
            "ResiDual keeps a gradient floor",
            "seq2seq decoder",
            "residual",
            f"first/last >= {VANISHING_RATIO:g}",
            not is_vanishing(r["seq2seq decoder", "residual", N]),
        ),
        ratio_check(
            "Pre-LN's lower blocks get larger gradients than its upper ones",
            "seq2seq decoder",
            "pre-ln",
            "first/last > 1",
            r["seq2seq decoder", "pre-ln", N] > 1,
        ),
    ]
    return checks
