"""`residual-probe figures`: regenerate the paper-style figures and their checks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..ownership import owned_out
from .app import user_errors
from .options import OverwriteOpt, csv_list, invoked_command
from .render import echo_figures, say


def figures(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option(help="Folder for the figures, their CSVs and checks.{csv,json}.")
    ] = Path("figures"),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Small sizes and fewer depths/steps (about 90 s on 2 CPU cores), as CI runs it.",
        ),
    ] = False,
    only: Annotated[str, typer.Option(help="Comma-separated studies to run (default: all).")] = "",
    overwrite: OverwriteOpt = False,
):
    """Regenerate the paper-style figures: run every study (residual_probe.studies) and print its checks.

    Each study writes OUT/<name>.png and OUT/<name>.csv; all checks (claim, predicted,
    measured, agreement) go to OUT/checks.csv and OUT/checks.json.
    """
    with user_errors(), owned_out(out, invoked_command(ctx), overwrite, update=bool(only)):
        from ..studies import run_all

        meta = run_all(out, quick=quick, only=csv_list(only), echo=say)
        echo_figures(meta, out)
