"""The `residual-probe` command line: one command per job.

Heavy modules (torch, matplotlib, transformers) are imported inside the commands so that
`residual-probe --help` answers at once. Every command writes its artifacts under `--out`.
Errors in the user's input (`residual_probe.errors.UserError`) end the command with one
`error:` line on stderr and exit status 2; any other exception is a bug and ends with one
`internal error:` line and exit status 1 (RESIDUAL_PROBE_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .ownership import owned_out

app = typer.Typer(
    name="residual-probe",
    help="Diagnose residual connections and norm placement in Transformers: "
    "vanishing gradients (the Post-LN failure) and representation collapse (the Pre-LN failure).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Options shared by several commands.
FormatOpt = Annotated[
    str, typer.Option("--format", help="Figure formats, comma-separated: png,pdf,svg.")
]
HeadsOpt = Annotated[int, typer.Option(help="Attention heads.")]
BatchOpt = Annotated[int, typer.Option(help="Sequences per batch.")]
FfnOpt = Annotated[int, typer.Option(help="FFN hidden width.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")]
DModelOpt = Annotated[int, typer.Option("--d-model", help="Model width.")]
OutOpt = Annotated[Path, typer.Option(help="Output folder; the command owns it (see --overwrite).")]
# Options of the commands that read checkpoints and text (grad-norms --ckpt, collapse, diagnose).
CompareOpt = Annotated[
    Optional[list[Path]],
    typer.Option(help="Further checkpoints drawn in the same figures (repeatable)."),
]
LossOpt = Annotated[
    Optional[str],
    typer.Option(help="causal-lm, seq2seq or mlm (default: each checkpoint's own head)."),
]
TextOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data",
        help="UTF-8 text file, tokenized by the checkpoint's tokenizer (bytes for byte-level models); default: CPython's pydoc topics.",
    ),
]
TokensOpt = Annotated[
    int,
    typer.Option(help="Tokens of --data to use: floor(N / seq-len) windows of consecutive tokens."),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Unpickle with plain torch.load: runs any code in the file. Only for files you trust.",
    ),
]
BlocksOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Module-path pattern of the blocks when discovery fails, e.g. 'model.layers.*'."
    ),
]
SubsampleOpt = Annotated[
    int, typer.Option(help="Tokens kept per layer for the similarity and CKA matrices.")
]
CkptSeedOpt = Annotated[int, typer.Option(help="Seed for MLM masking and the token subsample.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace the outputs of an earlier run in --out (only the files that run wrote, as its manifest lists them); without it such a folder is refused.",
    ),
]


@app.callback()
def _root() -> None:
    """Diagnose residual connections and norm placement in Transformers."""


# SIGTERM (a cluster's preemption, `kill`) is handled like Ctrl-C: the job stops where it is,
# keeps what an interrupt keeps, and the command exits 143 (128 + 15) instead of 130.
_signal_received: list[int] = []


def install_sigterm():
    """Handle SIGTERM like Ctrl-C until `restore`; returns the previous handler (None: not installed)."""
    import signal

    _signal_received.clear()

    def on_sigterm(signum, frame):
        if _signal_received:  # already stopping: let the job finish saving
            return
        _signal_received.append(signum)
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        return None


def restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors():
    """One stderr line for any exception: UserError exit 2, interrupt 130, anything else (a bug) exit 1.

    Set RESIDUAL_PROBE_DEBUG=1 to see the traceback instead.
    """
    from .errors import UserError

    previous = (
        install_sigterm()
    )  # for this command only: an embedding process keeps its own handler
    try:
        if os.environ.get("RESIDUAL_PROBE_DEBUG"):
            yield
            return
        try:
            yield
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            if _signal_received:
                fail("terminated (SIGTERM); files already written are complete", code=143)
            fail("interrupted; files already written are complete", code=130)
        except UserError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except Exception as exc:
            from .integrations import missing_extra

            extra = missing_extra(exc) if isinstance(exc, ImportError) else None
            if extra is not None:  # an optional package is missing: the user's to install
                fail(str(extra))
            first = str(exc).splitlines()[0] if str(exc) else ""
            typer.echo(
                f"internal error: {type(exc).__name__}: {first} (set RESIDUAL_PROBE_DEBUG=1 for the traceback)",
                err=True,
            )
            raise typer.Exit(1) from None
    finally:
        restore_sigterm(previous)


def csv_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def formats_option(value: str) -> tuple[str, ...]:
    from .plots.style import FORMATS

    fmts = csv_list(value)
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        fail(f"--format: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(FORMATS)}")
    return fmts


@contextlib.contextmanager
def progress_bar(description: str):
    """A rich progress bar on stderr (stdout holds results only, so `cmd > out.txt` keeps them clean);
    none when stderr is not a terminal. Yields `start(total) -> advance()`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
        disable=not sys.stderr.isatty(),
    ) as bar:

        def start(total: int):
            task = bar.add_task(description, total=total)
            return lambda: bar.advance(task)

        yield start


ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Run even when the memory estimate exceeds what the machine has free."
    ),
]
AllowMissingOpt = Annotated[
    bool,
    typer.Option(
        "--allow-missing-weights",
        help="Measure a checkpoint whose files lack some weights (after resolving tied and aliased names), leaving those at random initialization; the verdict then starts with 'partly random model'. Without it such a checkpoint is an error.",
    ),
]
AllowUnusedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unused-weights",
        help="Measure a Hugging Face checkpoint whose files hold weights of blocks its config does not declare (a truncated model). Without it that is an error.",
    ),
]
DictOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--dict",
        help="fairseq checkpoints: the dictionary (fairseq's dict.txt) to tokenize --data with: whitespace-split words, </s> after each line; the text must be preprocessed (BPE) as the training data was. Default: UTF-8 bytes shifted past the 4 special ids.",
    ),
]

# The inputs of the commands that measure checkpoints on text (collapse, diagnose), declared once:
# name -> (annotation, default); `with_checkpoint_inputs` adds them to a command's parameters.
CHECKPOINT_INPUTS = {
    "data": (TextOpt, None),
    "tokens": (TokensOpt, 8192),
    "batch": (
        Annotated[int, typer.Option(help="Windows per forward (and backward, for a gradient).")],
        8,
    ),
    "seq_len": (SeqLenOpt, 256),
    "subsample": (SubsampleOpt, 256),
    "seed": (CkptSeedOpt, 0),
    "trust_pickle": (TrustPickleOpt, False),
    "allow_missing_weights": (AllowMissingOpt, False),
    "allow_unused_weights": (AllowUnusedOpt, False),
    "dict_": (DictOpt, None),
    "blocks": (BlocksOpt, None),
}


def with_checkpoint_inputs(before: str):
    """Decorator: CHECKPOINT_INPUTS become parameters of the command, placed before its parameter
    `before` (the order of --help); the command receives them in `**inputs`. Typer reads the
    parameters from the function's signature, which this sets (`__signature__`)."""
    import inspect

    def wrap(fn):
        own = [
            p.replace(kind=p.KEYWORD_ONLY)
            for p in inspect.signature(fn, eval_str=True).parameters.values()
            if p.kind != p.VAR_KEYWORD
        ]
        at = next(i for i, p in enumerate(own) if p.name == before)
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default)
            for name, (ann, default) in CHECKPOINT_INPUTS.items()
        ]
        fn.__signature__ = inspect.Signature(own[:at] + shared + own[at:])
        return fn

    return wrap


def checkpoint_fields(ckpt: Path, compare, inputs: dict) -> dict:
    """The jobs' CheckpointInputs fields (jobs.inspection) from the command's --ckpt, --compare and
    CHECKPOINT_INPUTS (--subsample, collapse's own, left out)."""
    return dict(
        ckpts=tuple(str(p) for p in [ckpt, *(compare or [])]),
        data=str(inputs["data"]) if inputs["data"] else None,
        tokens=inputs["tokens"],
        batch=inputs["batch"],
        seq_len=inputs["seq_len"],
        seed=inputs["seed"],
        trust_pickle=inputs["trust_pickle"],
        allow_missing=inputs["allow_missing_weights"],
        allow_unused=inputs["allow_unused_weights"],
        dictionary=str(inputs["dict_"]) if inputs["dict_"] else None,
        blocks=inputs["blocks"],
    )


# grad-norms options that belong to one of its two modes (reference models, or --ckpt)
REFERENCE_ONLY = frozenset(
    {
        "depth",
        "placements",
        "arch",
        "d_model",
        "heads",
        "ffn",
        "seeds",
        "steps",
        "lr",
        "warmup",
        "init",
        "norm",
        "theory",
    }
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


def given_options(ctx: typer.Context) -> set[str]:
    """The options the user typed (not defaults), by parameter name."""
    # compared by name: typer may ship its own copy of click, with its own ParameterSource enum
    return {
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
    }


def _flag(ctx: typer.Context, name: str) -> str:
    return next((p.opts[0] for p in ctx.command.params if p.name == name), f"--{name}")


def invoked_command(ctx: typer.Context) -> str:
    """The current command as a shell line: its name and every option whose value is not the default."""
    import shlex

    parts = ["residual-probe", ctx.info_name or ""]
    given = given_options(ctx)
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if (
            value is None
            or value in ((), [])
            or (value == param.default and param.name not in given)
        ):
            continue  # a default the user did not type
        flag = param.opts[0]
        if getattr(param, "is_flag", False):
            parts.append(flag)
        else:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                parts += [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def echo_data(data: dict) -> None:
    """The tokenization used and every change to the requested data (rounding, short text), on the console."""
    from .report import data_line

    typer.echo(f"  {data_line(data)}")
    for message in data.get("messages", []):
        typer.echo(f"  note: {message}")


def report_files(paths) -> None:
    for p in paths:
        typer.echo(f"wrote {p}")


@app.command("grad-norms")
def grad_norms(
    ctx: typer.Context,
    depth: Annotated[
        int, typer.Option(help="Blocks per stack (encoder and decoder each for seq2seq).")
    ] = 48,
    placements: Annotated[
        str, typer.Option(help="Comma-separated placements to compare.")
    ] = "post-ln,pre-ln,residual",
    arch: Annotated[
        str,
        typer.Option(
            help="seq2seq (translation, the paper's setting), decoder (causal LM) or encoder."
        ),
    ] = "seq2seq",
    d_model: DModelOpt = 256,
    heads: HeadsOpt = 4,
    ffn: FfnOpt = 1024,
    seeds: Annotated[
        int, typer.Option(help="Seeds per placement (0..seeds-1); the figure shades their spread.")
    ] = 3,
    batch: BatchOpt = 8,
    seq_len: Annotated[
        Optional[int],
        typer.Option("--seq-len", help="Tokens per sequence (default 32; 256 with --ckpt)."),
    ] = None,
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
    norm: Annotated[str, typer.Option(help="layernorm or rmsnorm.")] = "layernorm",
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
):
    """Per-layer gradient norms: do gradients vanish toward the input?

    Reference models (default): per placement and seed, at initialization or over --steps Adam steps.
    Writes OUT/grad_norms.csv (placement, seed, step, stack, layer, sublayer, param_grad_norm),
    OUT/grad_norms.json (config, versions, seeds, wall times, summary) and OUT/grad_norms.png.

    A checkpoint (--ckpt PATH [--compare PATH ...] [--loss causal-lm|seq2seq|mlm]): one gradient on
    real text, same three files (placement column = the model's label). Data contract: the first
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
    if ckpt is not None:
        wrong = given & REFERENCE_ONLY
        if wrong:
            fail(
                f"{_flag(ctx, sorted(wrong)[0])} sets up the reference models and does not apply with --ckpt"
            )
        return _grad_norms_ckpt(
            ckpt,
            compare,
            loss,
            data,
            tokens,
            seq_len if seq_len is not None else 256,
            batch,
            trust_pickle,
            allow_missing_weights,
            dict_,
            blocks,
            out,
            fmts,
            invoked_command(ctx),
            overwrite,
            allow_unused_weights,
            force,
        )
    wrong = given & CKPT_ONLY
    if wrong:
        fail(f"{_flag(ctx, sorted(wrong)[0])} needs --ckpt")
    seq_len = 32 if seq_len is None else seq_len
    with user_errors(), owned_out(out, invoked_command(ctx), overwrite):
        from .jobs.grad_norms import GradNormsSpec, run_grad_norms

        spec = GradNormsSpec(
            placements=csv_list(placements),
            arch=arch,
            depth=depth,
            d_model=d_model,
            heads=heads,
            ffn=ffn,
            seeds=seeds,
            batch=batch,
            seq_len=seq_len,
            steps=steps,
            lr=lr,
            warmup=warmup,
            data=str(data) if data else None,
            init=init,
            norm=norm,
            theory=theory,
            force=force,
        )
        with progress_bar(f"grad-norms {arch} depth {depth}") as start:
            meta = run_grad_norms(spec, out, formats=fmts, progress=start, echo=typer.echo)
        for s in meta["summary"]:
            if s["step"] == spec.steps:
                typer.echo(
                    f"{s['stack']:>8} {s['placement']:>10}: first/last block grad norm = {s['first_over_last']:.3g}"
                )
        for v in meta["verdicts"]:
            typer.echo(f"{v['stack']:>8} {v['placement']:>10}: {v['verdict']}")
        if meta["nonfinite_values"]:
            typer.echo(
                f"warning: {meta['nonfinite_values']} non-finite gradient norms recorded (NaN/inf)",
                err=True,
            )
        report_files(meta["files"])


def _grad_norms_ckpt(
    ckpt,
    compare,
    loss,
    data,
    tokens,
    seq_len,
    batch,
    trust_pickle,
    allow_missing,
    dict_,
    blocks,
    out,
    fmts,
    command: str,
    overwrite: bool,
    allow_unused: bool,
    force: bool,
) -> None:
    with user_errors(), owned_out(out, command, overwrite):
        from .jobs.ckpt_grads import CkptGradSpec, run_ckpt_grad_norms

        spec = CkptGradSpec(
            ckpts=tuple(str(p) for p in [ckpt, *(compare or [])]),
            loss=loss,
            data=str(data) if data else None,
            tokens=tokens,
            seq_len=seq_len,
            batch=batch,
            trust_pickle=trust_pickle,
            allow_missing=allow_missing,
            allow_unused=allow_unused,
            dictionary=str(dict_) if dict_ else None,
            blocks=blocks,
            force=force,
        )
        with progress_bar("grad-norms --ckpt") as start:
            meta = run_ckpt_grad_norms(spec, out, formats=fmts, progress=start)
        echo_gradient_models(meta["models"])
        report_files(meta["files"])


def echo_gradient_models(models: list[dict]) -> None:
    from .analysis.diagnosis import gradient_by_part

    for m in models:
        if "skipped" in m:
            typer.echo(f"{m['label']}: gradients not measured: {m['skipped']}")
            continue
        depth_txt = ", ".join(f"{s} {n}" for s, n in m["depth"].items())
        typer.echo(
            f"{m['label']}: {m['family']}, {m['parameters']:,} parameters, width {m['width']}, {depth_txt} blocks; "
            f"loss {m['loss']} = {m['mean_loss']:.4f}"
        )
        typer.echo(
            f"  placement: {m['placement']} (from block structure; {m['placement_detail']}); norm: {m['norm_type']}"
        )
        for w in m.get("warnings", []):
            typer.echo(f"warning: {m['label']}: {w}", err=True)
        if m.get("whole_model"):
            typer.echo(f"  gradient norm: {gradient_by_part(m)}")
        echo_data(m["data"])
        random = (
            f"partly random model ({len(m['partly_random'])} weights at random initialization): "
            if m["partly_random"]
            else ""
        )
        for v in m["verdicts"]:
            typer.echo(f"  verdict {v['stack']}: {random}{v['verdict']}")
        for note in m["notes"]:
            typer.echo(f"  note: {note}")
        if m["nonfinite_values"]:
            typer.echo(
                f"warning: {m['label']}: {m['nonfinite_values']} non-finite gradient norms (NaN/inf)",
                err=True,
            )


@app.command("train")
def train(
    ctx: typer.Context,
    placement: Annotated[
        str, typer.Option(help="Norm placement of the model to train.")
    ] = "residual",
    arch: Annotated[str, typer.Option(help="decoder (causal LM), encoder or seq2seq.")] = "decoder",
    depth: Annotated[int, typer.Option(help="Blocks per stack.")] = 24,
    d_model: DModelOpt = 128,
    heads: HeadsOpt = 4,
    ffn: FfnOpt = 512,
    batch: BatchOpt = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens (bytes) per sequence.")] = 64,
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
    dropout: Annotated[float, typer.Option(help="Dropout rate.")] = 0.0,
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
    out: OutOpt = Path("results/train"),
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
):
    """Train a small deep model on real text, recording per-layer gradients and collapse as it goes.

    Writes OUT/loss.csv, OUT/probe.csv (flushed as written), OUT/model/ (a checkpoint that
    `collapse --ckpt` reads), OUT/train.json and OUT/loss.png. Ctrl-C keeps all of it.
    """
    with user_errors(), owned_out(out, invoked_command(ctx), overwrite):
        from .jobs.train import TrainSpec, run_train

        spec = TrainSpec(
            placement=placement,
            arch=arch,
            depth=depth,
            d_model=d_model,
            heads=heads,
            ffn=ffn,
            batch=batch,
            seq_len=seq_len,
            steps=steps,
            lr=lr,
            warmup=warmup,
            seed=seed,
            data=str(data) if data else None,
            dropout=dropout,
            probe_every=probe_every,
            forward_every=forward_every,
            eval_every=eval_every,
            clip=clip,
            force=force,
        )
        with progress_bar(f"train {placement} depth {depth}") as start:
            meta = run_train(spec, out, progress=start, echo=typer.echo)
        d = meta.get("diverged")
        if d is not None:  # one line; train.json holds the same under "diverged"
            typer.echo(
                f"warning: training diverged: the loss became {d['train_loss']} at step {d['step']} "
                f"(lr {d['lr']:.3g}); stopped after {meta['steps_done']} steps",
                err=True,
            )
        else:
            typer.echo(
                f"final held-out loss {meta['final_val_loss']:.4f} nats/byte after {meta['steps_done']} steps "
                f"({meta['wall_seconds']:.0f} s)"
            )
        from .analysis.instability import Event

        events = meta.get("instability_events", [])
        typer.echo(f"instability events: {len(events) or 'none'}")
        for e in events:
            typer.echo(f"  {Event(**e).describe()}")
        report_files(meta["files"] + [str(Path(out) / "train.json")])


@app.command("figures")
def figures(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option(help="Folder for the figures, their CSVs and checks.{csv,json}.")
    ] = Path("figures"),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Small sizes and fewer depths/steps (about 20 s), as CI runs it."
        ),
    ] = False,
    only: Annotated[str, typer.Option(help="Comma-separated analyses to run (default: all).")] = "",
    overwrite: OverwriteOpt = False,
):
    """Regenerate the paper-style figures: run every study (residual_probe.studies) and print its checks.

    Each study writes OUT/<name>.png and OUT/<name>.csv; all checks (claim, predicted,
    measured, agreement) go to OUT/checks.csv and OUT/checks.json.
    """
    with user_errors(), owned_out(out, invoked_command(ctx), overwrite, update=bool(only)):
        from .studies import run_all

        meta = run_all(out, quick=quick, only=csv_list(only), echo=typer.echo)
        n_bad = sum(1 for c in meta["checks"] if c["agreement"].startswith("no"))
        typer.echo(
            f"{len(meta['checks'])} checks, {n_bad} disagree with the claim; wrote {Path(out) / 'checks.csv'}"
        )


@app.command("bounds")
def bounds(
    ctx: typer.Context,
    depth: Annotated[
        str,
        typer.Option(
            help="Depth, or comma-separated depths; one depth D measures Theorem 1 on 6, 12, 24, ... up to D."
        ),
    ] = "48",
    arch: Annotated[
        str,
        typer.Option(
            help="Architecture for Xiong's statements and the collapse shape: encoder (the lemma's setting), decoder or seq2seq. ResiDual's gradient statements always use seq2seq."
        ),
    ] = "encoder",
    d_model: DModelOpt = 128,
    heads: HeadsOpt = 4,
    ffn: FfnOpt = 512,
    seeds: Annotated[int, typer.Option(help="Seeds per model (0..seeds-1).")] = 3,
    batch: BatchOpt = 8,
    seq_len: SeqLenOpt = 32,
    settings: Annotated[
        str, typer.Option(help="Initializations, comma-separated: xiong (W^Q = W^K = 0), fairseq.")
    ] = "xiong,fairseq",
    out: OutOpt = Path("results/bounds"),
    format: FormatOpt = "png",
    force: ForceOpt = False,
    overwrite: OverwriteOpt = False,
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
        from .jobs.bounds import BoundsSpec, run_bounds

        spec = BoundsSpec(
            depths=depths,
            arch=arch,
            d_model=d_model,
            heads=heads,
            ffn=ffn,
            seeds=seeds,
            batch=batch,
            seq_len=seq_len,
            settings=csv_list(settings),
            force=force,
        )
        with progress_bar(f"bounds depth {max(depths) if depths else '?'}") as start:
            meta = run_bounds(spec, out, formats=fmts, progress=start, echo=typer.echo)
        print_checks(meta["checks"])
        if meta["nonfinite_values"]:
            typer.echo(
                f"warning: {meta['nonfinite_values']} non-finite values recorded (NaN/inf)",
                err=True,
            )
        report_files(meta["files"])


def print_checks(checks: list[dict]) -> None:
    """The checks on stdout: a table in a terminal; elsewhere (a file, a pipe) one plain line per
    check, so no column is squeezed to nothing by an assumed width."""
    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(checks_table(checks))
        return
    for c in checks:
        typer.echo(
            f"[{c['agreement']}] {c['statement']} ({c['setting']}, {c['placement']}): "
            f"predicted {c['predicted']}; measured {c['measured']}"
        )


def checks_table(checks: list[dict]):
    """The bounds checks as a rich table that fits the console: long cells wrap (or fold), the short
    setting and placement names stay whole."""
    from rich.table import Table

    table = Table(show_lines=True)
    for name, wide in (
        ("statement", 3),
        ("setting", 0),
        ("placement", 0),
        ("predicted", 2),
        ("measured", 2),
        ("agreement", 2),
    ):
        table.add_column(name, no_wrap=not wide, ratio=wide or None, overflow="fold")
    for c in checks:
        table.add_row(
            c["statement"],
            c["setting"],
            c["placement"],
            c["predicted"],
            c["measured"],
            c["agreement"],
        )
    return table


@app.command("collapse")
@with_checkpoint_inputs(before="placement")
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
        from .analysis.collapse import massive_sentence
        from .jobs.collapse import CollapseSpec, run_collapse

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
        for m in meta["models"]:
            declared = f", declared {m['declared_placement']}" if m["declared_placement"] else ""
            depth_txt = ", ".join(f"{s} {n}" for s, n in m["depth"].items())
            typer.echo(
                f"{m['label']}: {m['family']}, {m['parameters']:,} parameters, width {m['width']}, {depth_txt} blocks"
            )
            typer.echo(
                f"  placement: {m['placement']} (from block structure{declared}; {m['placement_detail']}); "
                f"norm: {m['norm_type']}"
            )
            echo_data(m["data"])
            random = (
                f"partly random model ({len(m['partly_random'])} weights at random initialization): "
                if m["partly_random"]
                else ""
            )
            typer.echo(f"  verdict: {random}{m['verdict']} ({m['verdict_from']})")
            for s in m["streams"]:
                top = ", ".join(
                    f"{r['layer']} (cos {r['cos_adjacent']:.4f})" for r in s["redundant"]
                )
                typer.echo(
                    f"  {s['stack']} {s['stream']}: {s['verdict']} ({s.get('basis', 'no finite cosines')}); "
                    f"most redundant blocks: {top}"
                )
            for f in m["massive_activations"]:
                typer.echo(f"  {massive_sentence(f)}")
            for note in m["notes"]:
                typer.echo(f"  note: {note}")
            if m["nonfinite_values"]:
                typer.echo(
                    f"warning: {m['label']}: {m['nonfinite_values']} non-finite values (NaN/inf)",
                    err=True,
                )
        report_files(meta["files"])


@app.command("diagnose")
@with_checkpoint_inputs(before="out")
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
        from .jobs.ckpt_grads import CkptGradSpec
        from .jobs.collapse import CollapseSpec
        from .jobs.diagnose import run_diagnose
        from .report import verdict_lines

        common = dict(checkpoint_fields(ckpt, compare, inputs), force=force)
        result = run_diagnose(
            CkptGradSpec(loss=loss, skip_without_head=loss is None, **common),
            CollapseSpec(subsample=inputs["subsample"], **common),
            out,
            command,
            progress_bar,
        )
        for label, lines in verdict_lines(result["gradients"], result["collapse"]).items():
            typer.echo(f"{label}:")
            for line in lines:
                typer.echo(f"  {line}")
        report_files(result["files"])


@app.command("plot")
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
    out: OutOpt = Path("results/plot"),
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
    with user_errors(), owned_out(out, invoked_command(ctx), overwrite):
        from .analysis.instability import WINDOW, Event, K
        from .jobs.plot import run_plot

        meta = run_plot(run, out, steps=picked or None, placement=placement, formats=fmts)
        s = meta["steps"]
        typer.echo(
            f"{meta['sink']}: {meta['rows']} rows, steps {s['first']}..{s['last']} ({s['count']} recorded)"
            + (
                "; an incomplete last line (run still writing) was skipped"
                if meta["partial_last_line_skipped"]
                else ""
            )
        )
        for m in meta["missing"]:
            typer.echo(f"not recorded: {m}")
        for note in meta["notes"]:
            typer.echo(f"note: {note}", err=True)
        for v in meta["gradient_verdicts"]:
            typer.echo(f"{v['stack']} step {v['step']}: {v['verdict']}")
        for c in meta["collapse_verdicts"]:
            name = c["stack"] + ("" if c["stream"] == "x" else f" stream {c['stream']}")
            since = f", {c['since_start']}" if c.get("since_start") else ""
            typer.echo(
                f"{name} step {c['step']}: collapse: {c['verdict']}"
                + (
                    f" (late-block adjacent cos {c['late_cos_adjacent']:.4f}{since})"
                    if "late_cos_adjacent" in c
                    else ""
                )
            )
        events = meta["instability_events"]
        typer.echo(
            f"instability events: {len(events) or 'none'} (a block's gradient norm or update ratio above "
            f"{K:g}x its median over the {WINDOW} recorded steps before)"
        )
        for e in events:
            typer.echo(f"  {Event(**e).describe()}")
        typer.echo(f"placement: {meta['placement'] or 'unknown'} ({meta['placement_source']})")
        n = meta["nonfinite"]
        if n["count"]:
            typer.echo(
                f"warning: {n['count']} non-finite values (NaN/inf), first at step {n['first_step']} "
                f"({', '.join(n['metrics'])}); marked in red in the figures",
                err=True,
            )
        report_files(meta["files"])


def main() -> None:
    """The console entry point: `app`, with an interrupted command's exit status kept.

    CPython exits by SIGINT (status -2, whatever sys.exit said) when a KeyboardInterrupt went
    unhandled in code it ran from a string (dataclass and typing machinery during imports) even if
    an outer handler caught it: a SIGTERM landing there lost the documented 143. An interrupted
    command has written its files, so it leaves at once with its own status."""
    try:
        app()
    except SystemExit as exc:
        if _signal_received or exc.code == 130:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
