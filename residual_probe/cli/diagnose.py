"""`residual-probe diagnose`: both questions for a checkpoint, and one report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..ownership import owned_out
from .app import user_errors
from .options import (
    CHECKPOINT_INPUTS,
    CompareOpt,
    ForceOpt,
    LossOpt,
    OutOpt,
    OverwriteOpt,
    checkpoint_fields,
    invoked_command,
    with_options,
)
from .render import echo_verdict_lines, progress_bar, report_files


@with_options(CHECKPOINT_INPUTS, before="out")
def diagnose(
    ctx: typer.Context,
    ckpt: Annotated[Path, typer.Option(help="Checkpoint: anything `collapse --ckpt` reads.")],
    compare: CompareOpt = None,
    loss: LossOpt = None,
    out: OutOpt = Path("results/diagnose"),
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
    **inputs,
):
    """The whole diagnosis of a checkpoint: do its gradients vanish toward the input, do its layers collapse?

    Runs `grad-norms --ckpt` (where the model has a loss head) and `collapse` on the same data
    (the data contract of `grad-norms --help`), into OUT/gradients/ and OUT/collapse/, and writes
    OUT/report.html (one self-contained page: verdicts in plain language with their numbers, the
    model description, figures embedded, tables, the command, versions and times) and OUT/report.md.
    """
    command = invoked_command(ctx)
    with user_errors(), owned_out(out, command, overwrite):
        from ..jobs.ckpt_grads import CkptGradSpec
        from ..jobs.collapse import CollapseSpec
        from ..jobs.diagnose import run_diagnose
        from ..report import verdict_lines

        common = dict(checkpoint_fields(ckpt, compare, inputs), force=force)
        result = run_diagnose(
            CkptGradSpec(loss=loss, skip_without_head=loss is None, **common),
            CollapseSpec(subsample=inputs["subsample"], **common),
            out,
            command,
            progress_bar,
        )
        echo_verdict_lines(verdict_lines(result["gradients"], result["collapse"]))
        report_files(result["files"])
