"""The papers' theory statements against the reference models at initialization.

One set of model measurements serves five figures, so this is one script rather than five:
- bounds_theorem1.png   the last block's W2 gradient against depth, log-log, with Xiong et al.'s
                        slopes (0 for Post-LN, -1/2 for Pre-LN)               (issue item 2)
- bounds_lemma2.png     hidden-state norm growth E||x_l||^2/d against Xiong et al.'s Lemma 2
                                                                               (issue item 4)
- bounds_adam.png       Adam's update condition number against gradient scale (ResiDual's
                        appendix argument, alpha*sqrt(d)/eps)                  (issue item 5)
- bounds_residual_gradient.png, bounds_collapse.png   ResiDual's gradient floor and collapse shape
It runs `residual-probe bounds`'s job (residual_probe.jobs.bounds) in both settings, Xiong's
(W^Q = W^K = 0) and fairseq's initialization, and returns its checks.
"""

from __future__ import annotations

from pathlib import Path

from ..analysis.checks import Check
from ..jobs.bounds import BoundsSpec, run_bounds


def run(out: Path, quick: bool = False) -> list[Check]:
    spec = (
        BoundsSpec(depths=(6, 12, 24), d_model=64, heads=4, ffn=256, seeds=2)
        if quick
        else BoundsSpec(depths=(6, 12, 24, 48))
    )
    meta = run_bounds(spec, out)
    return [Check(**row) for row in meta["checks"]]
