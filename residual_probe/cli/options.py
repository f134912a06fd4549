"""The options several commands share, declared once, and how a command reads its options.

Two option sets are added to commands as a whole (`with_options`): the reference model's
(`reference_model`: ReferenceModel's fields in jobs.reference, for grad-norms, bounds and train)
and the checkpoint inputs (`CHECKPOINT_INPUTS`: the data contract of collapse and diagnose,
turned into the jobs' CheckpointInputs fields by `checkpoint_fields`, which grad-norms --ckpt
uses too). Only typer and the standard library are imported here: `--help` stays instant.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer

from .app import fail

FormatOpt = Annotated[
    str, typer.Option("--format", help="Figure formats, comma-separated: png,pdf,svg.")
]
OutOpt = Annotated[Path, typer.Option(help="Output folder; the command owns it (see --overwrite).")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Run even when the memory estimate exceeds what the machine has free."
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace the outputs of an earlier run in --out (only the files that run wrote, as its manifest lists them); without it such a folder is refused.",
    ),
]

# ---- the reference model (grad-norms, bounds, train) ----------------------------------------

# ReferenceModel's fields as options: name -> (flag, type, help). Each command offers those it
# uses, with its own defaults; `arch` is worded by each command (what it selects there).
REFERENCE_MODEL = {
    "arch": ("--arch", str, ""),
    "d_model": ("--d-model", int, "Model width."),
    "heads": ("--heads", int, "Attention heads."),
    "ffn": ("--ffn", int, "FFN hidden width."),
    "batch": ("--batch", int, "Sequences per batch."),
    "seq_len": ("--seq-len", int, "Tokens per sequence."),
    "norm": ("--norm", str, "layernorm or rmsnorm."),
    "dropout": ("--dropout", float, "Dropout rate."),
    "qk_norm": (
        "--qk-norm",
        bool,
        "A norm (of --norm's kind) on each head's q and k (QK-layernorm, Wortsman et al. 2023): keeps attention logits from growing.",
    ),
    "hc_streams": (
        "--hc-streams",
        int,
        "Residual copies of the hc and mhc placements (hyper-connections' expansion rate n).",
    ),
}


def reference_model(help: Mapping[str, str], **defaults: Any) -> dict[str, tuple[Any, Any]]:
    """The reference-model options of a command: name -> (annotation, default) for each field in
    `defaults` (in that order), worded as REFERENCE_MODEL says or as `help` overrides."""
    group = {}
    for name, default in defaults.items():
        flag, kind, text = REFERENCE_MODEL[name]
        kind = Optional[kind] if default is None else kind
        group[name] = (Annotated[kind, typer.Option(flag, help=help.get(name, text))], default)
    return group


# ---- the checkpoint inputs (collapse, diagnose; grad-norms --ckpt in part) --------------------

CompareOpt = Annotated[
    Optional[list[Path]],
    typer.Option(help="Further checkpoints drawn in the same figures (repeatable)."),
]
LossOpt = Annotated[
    Optional[str],
    typer.Option(
        help="causal-lm, seq2seq, mlm or contrastive (unsupervised SimCSE, for a bare encoder); "
        "default: each checkpoint's own head (diagnose: contrastive for a bare encoder)."
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
BlocksOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Module-path pattern of the blocks when discovery fails, e.g. 'model.layers.*'."
    ),
]

# name -> (annotation, default); the names are the commands' parameters, CHECKPOINT_FIELD says
# which CheckpointInputs field each fills where the two differ
CHECKPOINT_INPUTS = {
    "data": (
        Annotated[
            Optional[Path],
            typer.Option(
                "--data",
                help="UTF-8 text file, tokenized by the checkpoint's tokenizer (bytes for byte-level models); default: CPython's pydoc topics.",
            ),
        ],
        None,
    ),
    "tokens": (TokensOpt, 8192),
    "batch": (
        Annotated[int, typer.Option(help="Windows per forward (and backward, for a gradient).")],
        8,
    ),
    "seq_len": (Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")], 256),
    "subsample": (
        Annotated[
            int, typer.Option(help="Tokens kept per layer for the similarity and CKA matrices.")
        ],
        256,
    ),
    "seed": (
        Annotated[int, typer.Option(help="Seed for MLM masking and the token subsample.")],
        0,
    ),
    "trust_pickle": (TrustPickleOpt, False),
    "allow_missing_weights": (AllowMissingOpt, False),
    "allow_unused_weights": (AllowUnusedOpt, False),
    "dict_": (DictOpt, None),
    "blocks": (BlocksOpt, None),
}
CHECKPOINT_FIELD = {
    "allow_missing_weights": "allow_missing",
    "allow_unused_weights": "allow_unused",
    "dict_": "dictionary",
}


def checkpoint_fields(ckpt: Path, compare, inputs: Mapping[str, Any]) -> dict:
    """The jobs' CheckpointInputs fields from --ckpt, --compare and the CHECKPOINT_INPUTS found in
    `inputs` (a command's parameters); an input the command does not offer keeps the spec's
    default, and --subsample (collapse's own field) is left to the command."""
    fields: dict[str, Any] = {"ckpts": tuple(str(p) for p in [ckpt, *(compare or [])])}
    for name in CHECKPOINT_INPUTS:
        if name in inputs and name != "subsample":
            value = inputs[name]
            fields[CHECKPOINT_FIELD.get(name, name)] = (
                str(value) if isinstance(value, Path) else value
            )
    return fields


def with_options(group: Mapping[str, tuple[Any, Any]], before: str):
    """Decorator: the options of `group` (name -> (annotation, default)) become parameters of the
    command, placed before its parameter `before` (the order of --help); the command receives
    them in `**kwargs`. Typer reads the parameters from the function's signature, which this
    sets (`__signature__`)."""

    def wrap(fn):
        own = [
            p.replace(kind=p.KEYWORD_ONLY)
            for p in inspect.signature(fn, eval_str=True).parameters.values()
            if p.kind != p.VAR_KEYWORD
        ]
        at = next(i for i, p in enumerate(own) if p.name == before)
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default)
            for name, (ann, default) in group.items()
        ]
        fn.__signature__ = inspect.Signature(own[:at] + shared + own[at:])
        return fn

    return wrap


# ---- reading the options ----------------------------------------------------------------------


def csv_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def formats_option(value: str) -> tuple[str, ...]:
    from ..plots.style import FORMATS

    fmts = csv_list(value)
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        fail(f"--format: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(FORMATS)}")
    return fmts


def given_options(ctx: typer.Context) -> set[str]:
    """The options the user typed (not defaults), by parameter name."""
    # compared by name: typer may ship its own copy of click, with its own ParameterSource enum
    return {
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
    }


def option_flag(ctx: typer.Context, name: str) -> str:
    """The flag of parameter `name` as the user types it (`dict_` -> --dict)."""
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
        values = value if isinstance(value, (list, tuple)) else [value]
        if param.param_type_name == "argument":  # positional: its value alone, as typed
            parts += [str(v) for v in values]
        elif getattr(param, "is_flag", False):
            parts.append(param.opts[0])
        else:
            for v in values:
                parts += [param.opts[0], str(v)]
    return " ".join(shlex.quote(p) for p in parts)
