"""`residual-probe collapse`: representation collapse of real checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..ownership import owned_out
from .app import user_errors
from .options import (
    CHECKPOINT_INPUTS,
    CompareOpt,
    ForceOpt,
    FormatOpt,
    OutOpt,
    OverwriteOpt,
    checkpoint_fields,
    formats_option,
    invoked_command,
    with_options,
)
from .render import echo_collapse_models, progress_bar, report_files


@with_options(CHECKPOINT_INPUTS, before="placement")
def collapse(
    ctx: typer.Context,
    ckpt: Annotated[
        Path,
        typer.Option(
            help="Checkpoint: a residual-probe or Hugging Face folder, a fairseq .pt, or a bare state dict (.pt/.bin/.safetensors)."
        ),
    ],
    compare: CompareOpt = None,
    label: Annotated[
        Optional[list[str]],
        typer.Option(
            "--label",
            help="Name of each model in the figures and tables, in the order --ckpt, then each --compare (repeatable); default: the shortest path suffixes that tell them apart.",
        ),
    ] = None,
    placement: Annotated[
        Optional[str],
        typer.Option(help="Bare state dicts: the placement the weights were trained with."),
    ] = None,
    heads: Annotated[Optional[int], typer.Option(help="Bare state dicts: attention heads.")] = None,
    depth: Annotated[
        Optional[int],
        typer.Option(help="Bare state dicts: blocks per stack (checked against the weights)."),
    ] = None,
    d_model: Annotated[
        Optional[int],
        typer.Option("--d-model", help="Bare state dicts: width (checked against the weights)."),
    ] = None,
    ffn: Annotated[
        Optional[int],
        typer.Option(help="Bare state dicts: FFN width (checked against the weights)."),
    ] = None,
    norm: Annotated[
        Optional[str], typer.Option(help="Bare state dicts: layernorm or rmsnorm.")
    ] = None,
    out: OutOpt = Path("results/collapse"),
    format: FormatOpt = "png",
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
    **inputs,
):
    """Representation collapse of real checkpoints: how much does each layer still change the representation?

    Writes OUT/collapse.csv (model, stack, layer, stream, metric, value), OUT/similarity.csv (layer x layer
    cosine and CKA), OUT/collapse.json (model summary, data, times) and OUT/collapse_curves.png,
    OUT/similarity.png, OUT/norm_growth.png; prints the detected placement, the verdict and the most
    redundant layers. Checkpoints are untrusted: no pickled code runs unless --trust-pickle.
    """
    fmts = formats_option(format)
    with user_errors(), owned_out(out, invoked_command(ctx), overwrite):
        from ..jobs.collapse import CollapseSpec, run_collapse

        bare = {
            "placement": placement,
            "heads": heads,
            "depth": depth,
            "d_model": d_model,
            "ffn": ffn,
            "norm": norm,
        }
        spec = CollapseSpec(
            **checkpoint_fields(ckpt, compare, inputs),
            subsample=inputs["subsample"],
            bare={k: v for k, v in bare.items() if v is not None},
            force=force,
            labels=tuple(label or ()),
        )
        with progress_bar("collapse") as start:
            meta = run_collapse(spec, out, formats=fmts, progress=start)
        echo_collapse_models(meta["models"])
        report_files(meta["files"])
