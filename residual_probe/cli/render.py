"""What the commands print, by one rule: results and verdicts on stdout (`result`), so that
`residual-probe COMMAND > out.txt` holds only them; progress, notes, warnings and `wrote` lines
on stderr (`say`, `note`, `warn`), as is the progress bar.

Each `echo_*` takes the dict a job returned and prints it; nothing here computes a verdict.
Sentences the diagnose report prints too come from `residual_probe.report` (`data_line`,
`partly_random`, `verdict_lines`), so the console and the report say the same thing.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer


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


def result(line: str) -> None:
    """A result or a verdict: stdout."""
    typer.echo(line)


def say(line: str, err: bool = True) -> None:
    """Progress and what a command did (memory estimate, `== study`, `wrote ...`): stderr.
    Jobs take it as their `echo(line, err=...)`; a job's `err=False` line is a result."""
    typer.echo(line, err=err)


def note(message: str) -> None:
    typer.echo(f"note: {message}", err=True)


def warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def report_files(paths) -> None:
    for p in paths:
        say(f"wrote {p}")


def echo_data(data: dict) -> None:
    """The tokenization used and every change to the requested data (rounding, short text), on the console."""
    from ..report import data_line

    result(f"  {data_line(data)}")
    for message in data.get("messages", []):
        note(message)


def echo_events(events: list[dict], why: str = "") -> None:
    """The instability events of a run, one line each (analysis.instability.Event)."""
    from ..analysis.instability import Event

    result(f"instability events: {len(events) or 'none'}{why}")
    for e in events:
        result(f"  {Event(**e).describe()}")


def echo_precursors(precursors: list[dict]) -> None:
    """The precursor warnings of a run, one line each (analysis.precursors.Precursor)."""
    from ..analysis.precursors import Precursor

    result(f"precursor warnings: {len(precursors) or 'none'}")
    for p in precursors:
        result(f"  {Precursor(**p).describe()}")


# ---- checkpoints (grad-norms --ckpt, collapse) ------------------------------------------------


def model_line(m: dict) -> str:
    """A checkpoint's description: label, family, parameters, width and blocks per stack."""
    depth_txt = ", ".join(f"{s} {n}" for s, n in m["depth"].items())
    return (
        f"{m['label']}: {m['family']}, {m['parameters']:,} parameters, width {m['width']}, "
        f"{depth_txt} blocks"
    )


def placement_label(placement: str | None, reason: str | None) -> str:
    """A placement label with, for "other", the reason the detector gives (absent from files
    written before reasons existed)."""
    return f"{placement or 'unknown'}: {reason}" if reason else (placement or "unknown")


def placement_line(m: dict, declared: bool = True) -> str:
    """The placement detected from the block structure, with its reason when it is "other" (and,
    with `declared`, the one the config names, if any), the norm and whether q/k are normed."""
    declared = (
        f", declared {m['declared_placement']}" if declared and m["declared_placement"] else ""
    )
    qk = m.get("qk_norm")
    qk = "" if qk is None else f"; qk-norm: {'yes' if qk else 'no'}"
    label = placement_label(m["placement"], m.get("placement_reason"))
    return (
        f"  placement: {label} (from block structure{declared}; {m['placement_detail']}); "
        f"norm: {m['norm_type']}{qk}"
    )


def echo_gradient_models(models: list[dict]) -> None:
    """grad-norms --ckpt: per model its description, gradient norms, verdicts and notes."""
    from ..analysis.diagnosis import gradient_by_part
    from ..report import partly_random

    for m in models:
        if "skipped" in m:
            result(f"{m['label']}: gradients not measured: {m['skipped']}")
            continue
        result(f"{model_line(m)}; loss {m['loss']} = {m['mean_loss']:.4f}")
        result(placement_line(m, declared=False))
        for w in m.get("warnings", []):
            warn(f"{m['label']}: {w}")
        if m.get("whole_model"):
            result(f"  gradient norm: {gradient_by_part(m)}")
        echo_data(m["data"])
        random = partly_random(m["partly_random"])
        for v in m["verdicts"]:
            result(f"  verdict {v['stack']}: {random}{v['verdict']}")
        for line in m["notes"]:
            note(line)
        if m["nonfinite_values"]:
            warn(f"{m['label']}: {m['nonfinite_values']} non-finite gradient norms (NaN/inf)")


def echo_collapse_models(models: list[dict]) -> None:
    """collapse: per model its description, verdict, most redundant blocks per stream, notes."""
    from ..analysis.collapse import massive_sentence
    from ..analysis.verdicts import stream_name
    from ..report import partly_random

    for m in models:
        result(model_line(m))
        result(placement_line(m))
        echo_data(m["data"])
        random = partly_random(m["partly_random"])
        result(f"  verdict: {random}{m['verdict']} ({m['verdict_from']})")
        for s in m["streams"]:
            top = ", ".join(f"{r['layer']} (cos {r['cos_adjacent']:.4f})" for r in s["redundant"])
            result(
                f"  {stream_name(s['stack'], s['stream'])}: {s['verdict']} ({s.get('basis', 'no finite cosines')}); "
                f"most redundant blocks: {top}"
            )
        for f in m["massive_activations"]:
            result(f"  {massive_sentence(f)}")
        for line in m["notes"]:
            note(line)
        if m["nonfinite_values"]:
            warn(f"{m['label']}: {m['nonfinite_values']} non-finite values (NaN/inf)")


def echo_verdict_lines(verdicts: dict[str, list[str]]) -> None:
    """diagnose: the report's verdict lines (report.verdict_lines), per model."""
    for label, lines in verdicts.items():
        result(f"{label}:")
        for line in lines:  # the report marks its warnings and notes with these prefixes
            if line.startswith("warning: "):
                warn(f"{label}: {line.removeprefix('warning: ')}")
            elif line.startswith("note: "):
                note(f"{label}: {line.removeprefix('note: ')}")
            else:
                result(f"  {line}")


# ---- reference models (grad-norms, train, bounds) and runs (plot, figures) --------------------


def echo_grad_norms(meta: dict, steps: int) -> None:
    """grad-norms: first/last block ratio per stack and placement at the last step, the verdicts."""
    for s in meta["summary"]:
        if s["step"] == steps:
            result(
                f"{s['stack']:>8} {s['placement']:>10}: first/last block grad norm = {s['first_over_last']:.3g}"
            )
    for v in meta["verdicts"]:
        result(f"{v['stack']:>8} {v['placement']:>10}: {v['verdict']}")
    if meta["nonfinite_values"]:
        warn(f"{meta['nonfinite_values']} non-finite gradient norms recorded (NaN/inf)")


def echo_train(meta: dict) -> None:
    """train: the final held-out loss (or where the run diverged) and the instability events."""
    d = meta.get("diverged")
    if d is not None:  # one line; train.json holds the same under "diverged"
        warn(
            f"training diverged: the loss became {d['train_loss']} at step {d['step']} "
            f"(lr {d['lr']:.3g}); stopped after {meta['steps_done']} steps"
        )
    else:
        result(
            f"final held-out loss {meta['final_val_loss']:.4f} nats/byte after {meta['steps_done']} steps "
            f"({meta['wall_seconds']:.0f} s)"
        )
    echo_events(meta.get("instability_events", []))
    echo_precursors(meta.get("precursors", []))


def print_checks(checks: list[dict]) -> None:
    """The checks on stdout: a table in a terminal; elsewhere (a file, a pipe) one plain line per
    check, so no column is squeezed to nothing by an assumed width."""
    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(checks_table(checks))
        return
    for c in checks:
        result(
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


def echo_figures(meta: dict, out: Path) -> None:
    """figures: how many checks ran and how many disagree with their claim."""
    n_bad = sum(1 for c in meta["checks"] if c["agreement"].startswith("no"))
    result(
        f"{len(meta['checks'])} checks, {n_bad} disagree with the claim; wrote {Path(out) / 'checks.csv'}"
    )


def echo_plot(meta: dict) -> None:
    """plot: what the sink holds, the verdicts at its last recorded step, events, placement."""
    from ..analysis.instability import WINDOW, K
    from ..analysis.verdicts import stream_name

    s = meta["steps"]
    result(
        f"{meta['sink']}: {meta['rows']} rows, steps {s['first']}..{s['last']} ({s['count']} recorded)"
        + (
            "; an incomplete last line (run still writing) was skipped"
            if meta["partial_last_line_skipped"]
            else ""
        )
    )
    for m in meta["missing"]:
        result(f"not recorded: {m}")
    for line in meta["notes"]:
        note(line)
    for v in meta["gradient_verdicts"]:
        result(f"{v['stack']} step {v['step']}: {v['verdict']}")
    for c in meta["collapse_verdicts"]:
        name = stream_name(c["stack"], c["stream"])
        since = f", {c['since_start']}" if c.get("since_start") else ""
        result(
            f"{name} step {c['step']}: collapse: {c['verdict']}"
            + (
                f" (late-block adjacent cos {c['late_cos_adjacent']:.4f}{since})"
                if "late_cos_adjacent" in c
                else ""
            )
        )
    echo_events(
        meta["instability_events"],
        f" (a block's gradient norm or update ratio above {K:g}x its median over the {WINDOW} "
        "recorded steps before)",
    )
    echo_precursors(meta["precursors"])
    label = placement_label(meta["placement"], meta.get("placement_reason"))
    result(f"placement: {label} ({meta['placement_source']})")
    n = meta["nonfinite"]
    if n["count"]:
        warn(
            f"{n['count']} non-finite values (NaN/inf), first at step {n['first_step']} "
            f"({', '.join(n['metrics'])}); marked in red in the figures"
        )
