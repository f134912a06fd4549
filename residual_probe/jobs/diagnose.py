"""The `diagnose` job: both questions for checkpoints, and one report.

Loads each checkpoint once (jobs.inspection) and hands it to both parts: the gradient of
`grad-norms --ckpt` (models with a loss head, or the contrastive loss for a bare encoder) and the
forward statistics of `collapse`, on the same text (the data contract of `checkpoints.text`); one
model is in memory at a time. Where the loss's forward pass is the one collapse measures (a
causal LM on its windows: `ckpt_grads.one_pass`), one probe records both in that pass, so the
model runs forward once; other losses (masked, contrastive, seq2seq) take a second forward. Writes OUT/gradients/ and OUT/collapse/ as those commands do, then
OUT/report.html and OUT/report.md (`report.write_report`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable, ContextManager

FIGURES = (
    ("Per-block gradient norm (one gradient on the text)", "gradients/grad_norms.png"),
    ("Adjacent cosine and block influence per block", "collapse/collapse_curves.png"),
    ("Layer x layer cosine similarity and linear CKA", "collapse/similarity.png"),
    ("Norm growth and relative update per block", "collapse/norm_growth.png"),
)


def run_diagnose(
    gspec,
    cspec,
    out: str | Path,
    command: str,
    progress: Callable[[str], ContextManager] | None = None,
) -> dict:
    """Both parts and the report; returns {"gradients": ..., "collapse": ..., "files": [...]}.

    `gspec` (CkptGradSpec) and `cspec` (CollapseSpec) must name the same checkpoints, loaded the same
    way (their CheckpointInputs fields other than `force` equal); each checkpoint is loaded once.
    progress(description) -> a context manager yielding `start(total) -> advance()` (the CLI's bar).
    """
    import torch

    from ..output import prepare_out
    from ..report import write_report
    from .ckpt_grads import measure_gradients, write_gradients
    from .collapse import measure_collapse, write_collapse
    from .inspection import CheckpointInputs, inspect_checkpoint

    out = Path(out)
    progress = progress or (lambda _: contextlib.nullcontext(None))
    gspec.validate()
    cspec.validate()
    shared = [f.name for f in fields(CheckpointInputs) if f.name != "force"]
    differ = [n for n in shared if getattr(gspec, n) != getattr(cspec, n)]
    if differ:
        raise ValueError(f"run_diagnose: the two specs differ in {', '.join(differ)}")
    gout, cout = prepare_out(out / "gradients"), prepare_out(out / "collapse")
    torch.manual_seed(cspec.seed)
    text, source, dictionary = cspec.read_inputs()
    grad_models, grad_rows, coll_models, coll_rows, sim_rows = [], [], [], [], []
    spent: dict[str, dict[str, float]] = {}  # label -> wall-clock seconds of each part
    t0 = time.perf_counter()
    for label, path in cspec.named():
        part = spent[label] = {}
        t = time.perf_counter()
        inspection = inspect_checkpoint(label, path, cspec, text, dictionary)
        part["load"], t = time.perf_counter() - t, time.perf_counter()
        with progress(f"diagnose: gradients of {label}") as start:
            # one pass where the loss's forward is collapse's (a causal LM): its statistics too
            model, rows, measured = measure_gradients(
                inspection, gspec, text, source, start, forward=cspec
            )
        grad_models.append(model)
        grad_rows += rows
        part["gradients"], t = time.perf_counter() - t, time.perf_counter()
        with progress(f"diagnose: collapse of {label}") as start:
            model, rows, sims = measure_collapse(inspection, cspec, text, source, start, measured)
        model["times"]["same_pass_as_gradient"] = measured is not None
        coll_models.append(model)
        coll_rows += rows
        sim_rows += sims
        part["collapse"] = time.perf_counter() - t
        del inspection
    wall = time.perf_counter() - t0
    grads = write_gradients(gout, gspec, grad_models, grad_rows, source, ("png",), wall)
    coll = write_collapse(cout, cspec, coll_models, coll_rows, sim_rows, source, ("png",), wall)
    figures = [(caption, out / rel) for caption, rel in FIGURES if (out / rel).is_file()]
    # wall-clock seconds of each part summed over the models (each checkpoint loaded once, for both
    # parts), the whole measurement, and with several models each model's own three
    names = {
        "load": "loading and placement detection",
        "gradients": "gradients (one gradient per model)",
        "collapse": "collapse (forward statistics)",
    }
    times = {name: sum(p[k] for p in spent.values()) for k, name in names.items()}
    times["all models, the three parts"] = wall
    if len(spent) > 1:
        times.update({f"{label}: {k}": v for label, p in spent.items() for k, v in p.items()})
    files = write_report(out, grads, coll, grad_rows, coll_rows, figures, command, times)
    return {"gradients": grads, "collapse": coll, "files": files}
