"""`residual-probe grad-norms`: per-layer gradient norms of reference models, or of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..ownership import owned_out
from .app import fail, user_errors
from .options import (
    AllowMissingOpt,
    AllowUnusedOpt,
    BlocksOpt,
    CompareOpt,
    DictOpt,
    ForceOpt,
    FormatOpt,
    LossOpt,
    OutOpt,
    OverwriteOpt,
    TokensOpt,
    TrustPickleOpt,
    checkpoint_fields,
    csv_list,
    formats_option,
    given_options,
    invoked_command,
    option_flag,
    reference_model,
    with_options,
)
from .render import echo_grad_norms, echo_gradient_models, progress_bar, report_files, say

MODEL = reference_model(
    help={
        "arch": "seq2seq (translation, the paper's setting), decoder (causal LM) or encoder.",
        "seq_len": "Tokens per sequence (default 32; 256 with --ckpt).",
    },
    arch="seq2seq",
    d_model=256,
    heads=4,
    ffn=1024,
    batch=8,
    seq_len=None,
    norm="layernorm",
    hc_streams=4,
)
# the options of one mode only: the reference models', or a checkpoint's (--batch and --seq-len
# serve both)
REFERENCE_ONLY = frozenset(
    {"depth", "placements", "seeds", "steps", "lr", "warmup", "init", "theory"}
    | (set(MODEL) - {"batch", "seq_len"})
)
CKPT_ONLY = frozenset(
    {
        "compare",
        "loss",
        "tokens",
        "trust_pickle",
        "allow_missing_weights",
        "allow_unused_weights",
        "dict_",
        "blocks",
    }
)


@with_options(MODEL, before="seeds")
def grad_norms(
    ctx: typer.Context,
    depth: Annotated[
        int, typer.Option(help="Blocks per stack (encoder and decoder each for seq2seq).")
    ] = 48,
    placements: Annotated[
        str,
        typer.Option(help="Comma-separated placements to compare; ALL: every registered one."),
    ] = "post-ln,pre-ln,residual",
    seeds: Annotated[
        int, typer.Option(help="Seeds per placement (0..seeds-1); the figure shades their spread.")
    ] = 3,
    steps: Annotated[
        int,
        typer.Option(
            help="Adam steps before the last recording (0: at initialization); every step is recorded."
        ),
    ] = 0,
    lr: Annotated[
        float, typer.Option(help="Adam learning rate (betas 0.9, 0.98 as fairseq).")
    ] = 5e-4,
    warmup: Annotated[
        int,
        typer.Option(
            help="Linear warm-up steps, then inverse-sqrt decay (fairseq); 0: constant lr."
        ),
    ] = 0,
    init: Annotated[
        str, typer.Option(help="fairseq (default) or xiong (W^Q = W^K = 0, Xavier elsewhere).")
    ] = "fairseq",
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="UTF-8 text file to train/measure on (byte tokens); default: synthetic task."
        ),
    ] = None,
    out: OutOpt = Path("results/grad-norms"),
    format: FormatOpt = "png",
    theory: Annotated[
        bool,
        typer.Option(
            "--theory",
            help="Overlay the predicted per-layer curves, fit each placement's decay rate, print verdicts.",
        ),
    ] = False,
    ckpt: Annotated[
        Optional[Path],
        typer.Option(
            help="Measure a checkpoint instead of reference models (anything `collapse --ckpt` reads); see the data contract below."
        ),
    ] = None,
    compare: CompareOpt = None,
    loss: LossOpt = None,
    tokens: TokensOpt = 8192,
    trust_pickle: TrustPickleOpt = False,
    allow_missing_weights: AllowMissingOpt = False,
    allow_unused_weights: AllowUnusedOpt = False,
    dict_: DictOpt = None,
    blocks: BlocksOpt = None,
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
    **model,
):
    """Per-layer gradient norms: do gradients vanish toward the input?

    Reference models (default): per placement and seed, at initialization or over --steps Adam steps.
    Writes OUT/grad_norms.csv (placement, seed, step, stack, layer, sublayer, param_grad_norm),
    OUT/grad_norms.json (config, versions, seeds, wall times, summary) and OUT/grad_norms.png.

    A checkpoint (--ckpt PATH [--compare PATH ...] [--loss causal-lm|seq2seq|mlm]): one gradient on
    real text, same three files (a model column, the model's label, in place of placement). Data contract: the first
    --tokens N tokens of --data (default: CPython's pydoc topics), as the checkpoint's own tokenizer
    encodes them without special tokens (UTF-8 bytes for our models; --dict for fairseq), cut into
    floor(N / L) consecutive non-overlapping windows of --seq-len L (default 256 with --ckpt), the
    rest dropped; the loss is the mean over all predicted positions of all windows, accumulated
    over batches of --batch windows, one gradient, model in eval mode (dropout off). causal-lm:
    next token; mlm: 15% of positions masked (seeded); seq2seq: each window is both source and
    target (a copy task), teacher-forced. Prints the verdict per stack: vanishing or not, the
    first/last and first/median block ratios, the fitted per-block rate with its interval.
    """
    fmts = formats_option(format)
    given = given_options(ctx)
    seq_len = model["seq_len"]
    if ckpt is not None:
        wrong = given & REFERENCE_ONLY
        if wrong:
            fail(
                f"{option_flag(ctx, sorted(wrong)[0])} sets up the reference models and does not apply with --ckpt"
            )
        inputs = {**ctx.params, "seq_len": seq_len if seq_len is not None else 256}
        with user_errors(), owned_out(out, invoked_command(ctx), overwrite):
            from ..jobs.ckpt_grads import CkptGradSpec

            spec = CkptGradSpec(**checkpoint_fields(ckpt, compare, inputs), loss=loss, force=force)
            _grad_norms_ckpt(spec, out, fmts)
        return
    wrong = given & CKPT_ONLY
    if wrong:
        fail(f"{option_flag(ctx, sorted(wrong)[0])} needs --ckpt")
    with user_errors(), owned_out(out, invoked_command(ctx), overwrite):
        from ..jobs.grad_norms import GradNormsSpec, run_grad_norms
        from ..models.placements import expand_placements

        spec = GradNormsSpec(
            **{**model, "seq_len": 32 if seq_len is None else seq_len},
            placements=expand_placements(csv_list(placements)),
            depth=depth,
            seeds=seeds,
            steps=steps,
            lr=lr,
            warmup=warmup,
            data=str(data) if data else None,
            init=init,
            theory=theory,
            force=force,
        )
        with progress_bar(f"grad-norms {spec.arch} depth {depth}") as start:
            meta = run_grad_norms(spec, out, formats=fmts, progress=start, echo=say)
        echo_grad_norms(meta, spec.steps)
        report_files(meta["files"])


def _grad_norms_ckpt(spec, out: Path, fmts: tuple[str, ...]) -> None:
    """grad-norms --ckpt: one gradient of each checkpoint (jobs.ckpt_grads), printed."""
    from ..jobs.ckpt_grads import run_ckpt_grad_norms

    with progress_bar("grad-norms --ckpt") as start:
        meta = run_ckpt_grad_norms(spec, out, formats=fmts, progress=start)
    echo_gradient_models(meta["models"])
    report_files(meta["files"])
