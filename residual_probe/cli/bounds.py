"""`residual-probe bounds`: each theory statement against the reference models at initialization."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..ownership import owned_out
from .app import fail, user_errors
from .options import (
    ForceOpt,
    FormatOpt,
    OutOpt,
    OverwriteOpt,
    csv_list,
    formats_option,
    invoked_command,
    reference_model,
    with_options,
)
from .render import print_checks, progress_bar, report_files, say, warn

MODEL = reference_model(
    help={
        "arch": "Architecture for Xiong's statements and the collapse shape: encoder (the lemma's setting), decoder or seq2seq. ResiDual's gradient statements always use seq2seq."
    },
    arch="encoder",
    d_model=128,
    heads=4,
    ffn=512,
    batch=8,
    seq_len=32,
)


@with_options(MODEL, before="seeds")
def bounds(
    ctx: typer.Context,
    depth: Annotated[
        str,
        typer.Option(
            help="Depth, or comma-separated depths; one depth D measures Theorem 1 on 6, 12, 24, ... up to D."
        ),
    ] = "48",
    seeds: Annotated[int, typer.Option(help="Seeds per model (0..seeds-1).")] = 3,
    settings: Annotated[
        str, typer.Option(help="Initializations, comma-separated: xiong (W^Q = W^K = 0), fairseq.")
    ] = "xiong,fairseq",
    out: OutOpt = Path("results/bounds"),
    format: FormatOpt = "png",
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
    **model,
):
    """Check each theory statement (Xiong et al. 2020 Lemma 2 and Theorem 1; ResiDual's gradient, collapse
    and Adam results) against the reference models at initialization.

    Writes OUT/bounds.csv (probe rows), OUT/bounds_checks.csv (statement, predicted, measured, agreement),
    OUT/bounds.json and one figure per statement (OUT/bounds_*.png); prints the checks table.
    """
    fmts = formats_option(format)
    try:
        depths = tuple(int(d) for d in csv_list(depth))
    except ValueError:
        fail(f"--depth: expected an integer or comma-separated integers, got {depth!r}")
    with user_errors(), owned_out(out, invoked_command(ctx), overwrite):
        from ..jobs.bounds import BoundsSpec, run_bounds

        spec = BoundsSpec(
            **model, depths=depths, seeds=seeds, settings=csv_list(settings), force=force
        )
        with progress_bar(f"bounds depth {max(depths) if depths else '?'}") as start:
            meta = run_bounds(spec, out, formats=fmts, progress=start, echo=say)
        print_checks(meta["checks"])
        if meta["nonfinite_values"]:
            warn(f"{meta['nonfinite_values']} non-finite values recorded (NaN/inf)")
        report_files(meta["files"])
