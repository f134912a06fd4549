"""`residual-probe plot`: paper-style figures and verdicts of any probe sink."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..ownership import owned_out
from .app import fail, user_errors
from .options import FormatOpt, OverwriteOpt, csv_list, formats_option, invoked_command
from .render import echo_plot, report_files


def plot(
    ctx: typer.Context,
    run: Annotated[
        Path,
        typer.Argument(
            help="A probe sink (.csv/.jsonl) or a folder holding one (probe.csv: a Trainer's output_dir, the train job's OUT)."
        ),
    ],
    steps: Annotated[
        str,
        typer.Option(
            help="Comma-separated recorded steps for the per-layer collapse and activation-gradient curves (default: first, middle, last)."
        ),
    ] = "",
    placement: Annotated[
        Optional[str],
        typer.Option(
            help="The run's norm placement, for the Pre-LN collapse reference (default: from train.json or probe_run.json beside the sink)."
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="Output folder, owned by this command (see --overwrite); default: RUN/plots/ "
            "(beside the sink when RUN is a file)."
        ),
    ] = None,
    format: FormatOpt = "png",
    overwrite: OverwriteOpt = False,
):
    """Paper-style figures of any probe sink (your own training run), and its verdicts at the last recorded step.

    Writes OUT/grad_heatmap.png (block x step, log colour), OUT/grad_steps.png (first/median/last block
    and their ratio over steps), OUT/act_grad.png and OUT/collapse.png (per block at the chosen steps;
    when recorded) and OUT/summary.json. A sink still being written is read up to its last complete line.
    """
    fmts = formats_option(format)
    try:
        picked = tuple(int(s) for s in csv_list(steps))
    except ValueError:
        fail(f"--steps: expected comma-separated integers, got {steps!r}")
    if out is None:  # each run's figures beside it: plotting a second run needs no --out
        out = (run if run.is_dir() else run.parent) / "plots"
    with user_errors(), owned_out(out, invoked_command(ctx), overwrite):
        from ..jobs.plot import run_plot

        meta = run_plot(run, out, steps=picked or None, placement=placement, formats=fmts)
        echo_plot(meta)
        report_files(meta["files"])
