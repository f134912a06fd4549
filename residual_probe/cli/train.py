"""`residual-probe train`: train a small deep reference model, probing it as it goes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..ownership import owned_out
from .app import user_errors
from .options import ForceOpt, OutOpt, OverwriteOpt, invoked_command, reference_model, with_options
from .render import echo_train, progress_bar, report_files, say

MODEL = reference_model(
    help={
        "arch": "decoder (causal LM), encoder or seq2seq.",
        "seq_len": "Tokens (bytes) per sequence.",
    },
    arch="decoder",
    d_model=128,
    heads=4,
    ffn=512,
    batch=16,
    seq_len=64,
    dropout=0.0,
    qk_norm=False,
    hc_streams=4,
)


@with_options(MODEL, before="steps")
def train(
    ctx: typer.Context,
    placement: Annotated[
        str, typer.Option(help="Norm placement of the model to train.")
    ] = "residual",
    depth: Annotated[int, typer.Option(help="Blocks per stack.")] = 24,
    steps: Annotated[int, typer.Option(help="Adam steps.")] = 500,
    lr: Annotated[float, typer.Option(help="Peak learning rate (Adam, betas 0.9, 0.98).")] = 1e-3,
    warmup: Annotated[
        int,
        typer.Option(
            help="Linear warm-up steps, then inverse-sqrt decay; 0: constant lr, no warm-up."
        ),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed for initialization and batches.")] = 0,
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="UTF-8 text file (byte tokens); default: CPython's pydoc topics, on every machine."
        ),
    ] = None,
    probe_every: Annotated[
        int, typer.Option("--probe-every", help="Record the probe every n-th step.")
    ] = 10,
    forward_every: Annotated[
        int,
        typer.Option(
            "--forward-every",
            help="Forward statistics (collapse) on every n-th recorded step, the first and the last; 1: on every one.",
        ),
    ] = 10,
    eval_every: Annotated[
        int, typer.Option("--eval-every", help="Held-out loss every n-th step.")
    ] = 50,
    clip: Annotated[
        float,
        typer.Option(
            help="Gradient clipping max-norm (0: none); the probe records before clipping."
        ),
    ] = 0.0,
    z_loss: Annotated[
        float,
        typer.Option(
            "--z-loss",
            help="Add COEF * mean(logsumexp(logits)^2) to the loss (PaLM's z-loss, e.g. 1e-4); loss.csv keeps the cross-entropy alone.",
            metavar="COEF",
        ),
    ] = 0.0,
    out: OutOpt = Path("results/train"),
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
    **model,
):
    """Train a small deep model on real text, recording per-layer gradients and collapse as it goes.

    Writes OUT/loss.csv, OUT/probe.csv (flushed as written), OUT/model/ (a checkpoint that
    `collapse --ckpt` reads), OUT/train.json and OUT/loss.png. Ctrl-C keeps all of it.
    """
    with user_errors(), owned_out(out, invoked_command(ctx), overwrite):
        from ..jobs.train import TrainSpec, run_train

        spec = TrainSpec(
            **model,
            placement=placement,
            depth=depth,
            steps=steps,
            lr=lr,
            warmup=warmup,
            seed=seed,
            data=str(data) if data else None,
            probe_every=probe_every,
            forward_every=forward_every,
            eval_every=eval_every,
            clip=clip,
            z_loss=z_loss,
            force=force,
        )
        with progress_bar(f"train {placement} depth {depth}") as start:
            meta = run_train(spec, out, progress=start, echo=say)
        echo_train(meta)
        report_files(meta["files"] + [str(Path(out) / "train.json")])
