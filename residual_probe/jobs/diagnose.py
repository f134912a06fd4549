"""The `diagnose` job: both questions for checkpoints, and one report.

Runs `grad-norms --ckpt` (models with a loss head, or the contrastive loss for a bare encoder)
into OUT/gradients/ and `collapse` into OUT/collapse/ on the same text (the data contract of
`checkpoints.text`), then writes OUT/report.html and OUT/report.md (`report.write_report`).
"""

from __future__ import annotations

import csv
import contextlib
import time
from pathlib import Path
from typing import Callable, ContextManager

FIGURES = (("Per-block gradient norm (one gradient on the text)", "gradients/grad_norms.png"),
           ("Adjacent cosine and block influence per block", "collapse/collapse_curves.png"),
           ("Layer x layer cosine similarity and linear CKA", "collapse/similarity.png"),
           ("Norm growth and relative update per block", "collapse/norm_growth.png"))


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def run_diagnose(gspec, cspec, out: str | Path, command: str,
                 progress: Callable[[str], ContextManager] | None = None) -> dict:
    """Both jobs and the report; returns {"gradients": ..., "collapse": ..., "files": [...]}.

    progress(description) -> a context manager yielding `start(total) -> advance()` (the CLI's bar).
    """
    from ..report import write_report
    from .ckpt_grads import run_ckpt_grad_norms
    from .collapse import run_collapse

    out = Path(out)
    progress = progress or (lambda _: contextlib.nullcontext(None))
    gspec.validate()
    cspec.validate()
    t0 = time.perf_counter()
    with progress("diagnose: gradients") as start:
        grads = run_ckpt_grad_norms(gspec, out / "gradients", progress=start)
    t1 = time.perf_counter()
    with progress("diagnose: collapse") as start:
        coll = run_collapse(cspec, out / "collapse", progress=start)
    t2 = time.perf_counter()
    figures = [(caption, out / rel) for caption, rel in FIGURES if (out / rel).is_file()]
    # wall-clock seconds of each part, each loading its checkpoints (the per-model lines split them)
    times = {"gradients (load + one gradient)": t1 - t0, "collapse (load + forward statistics)": t2 - t1}
    for m in grads["models"]:
        for k, v in m.get("times", {}).items():
            times[f"{m['label']} gradients: {k.removesuffix('_s')}"] = v
    files = write_report(out, grads, coll, _read(out / "gradients" / "grad_norms.csv"),
                         _read(out / "collapse" / "collapse.csv"), figures, command, times)
    return {"gradients": grads, "collapse": coll, "files": files}
