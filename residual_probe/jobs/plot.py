"""The `plot` job: the paper-style figures of any probe sink (a user's own run), and its verdicts.

RUN is a probe sink written by `Probe(sink=...)` in any loop, by the Hugging Face or Lightning
callbacks, or by the `train` job: a `.jsonl` or `.csv` file, or a folder holding one
(`probe.jsonl`, `probe.csv`). Lines are read up to the last complete one, so a sink that is
still being written can be drawn at any time.

Outputs in OUT:
- grad_heatmap.<fmt>   per-block gradient norm, layer x step, log colour scale (one panel per stack)
- grad_steps.<fmt>     first / median / last block gradient norm against step (vanishing as it develops)
- act_grad.<fmt>       activation-gradient norm per block at the chosen steps, per stream (when recorded)
- collapse.<fmt>       adjacent cosine and block influence per block at the chosen steps, with the
                       Pre-LN collapse reference where the stream is Pre-LN-like
- summary.json         what was found (steps, stacks, quantities present and missing, NaN/inf),
                       the last step's verdicts and the files written

Computations (ratios, fits, verdicts) come from `residual_probe.analysis`; the plots only draw.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..probe.records import COLUMNS
from ..probe.summary import stack_label

SINK_NAMES = ("probe.jsonl", "probe.csv", "probe.ndjson")
SUFFIXES = (".jsonl", ".ndjson", ".csv")
# Streams on which the Pre-LN collapse reference (ResiDual's toy model, cos = sqrt(k/(k+1))) applies:
# a stream that is never normalized and takes each update as x + F(LN(x)).
PRE_LN_STREAMS = {"pre-ln": ("x",), "residual": ("d",)}
PLACEMENTS = ("post-ln", "pre-ln", "residual", "deepnorm", "sandwich", "peri-ln", "b2t", "mix-ln", "lns", "rezero")


class PlotError(UserError):
    """Unusable input to `plot` (no sink, an empty sink, a file that is not a probe sink); one line."""


@dataclass
class Sink:
    path: Path
    rows: list[dict]
    partial_line: bool = False  # the last line was incomplete (a run still writing) and was left out
    notes: list[str] = field(default_factory=list)


def find_sink(run: str | Path) -> Path:
    p = Path(run)
    if not p.exists():
        raise PlotError(f"{str(p)!r} does not exist")
    if p.is_dir():
        for name in SINK_NAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SUFFIXES)
        if len(found) == 1:
            return found[0]
        if not found:
            raise PlotError(f"folder {str(p)!r} holds no probe sink (probe.jsonl or probe.csv)")
        raise PlotError(f"folder {str(p)!r} holds several possible sinks ({', '.join(q.name for q in found[:4])}); "
                        "name the file")
    if p.suffix.lower() not in SUFFIXES:
        raise PlotError(f"{str(p)!r} is not a probe sink: expected a .jsonl or .csv file, or a folder holding one")
    return p


def _row(raw: dict, where: str) -> dict:
    try:
        return {"step": int(raw["step"]), "stack": str(raw["stack"]), "layer": int(raw["layer"]),
                "sublayer": str(raw["sublayer"]), "stream": str(raw["stream"]), "metric": str(raw["metric"]),
                "value": float(raw["value"])}
    except (KeyError, TypeError, ValueError):
        raise PlotError(f"{where} is not a probe row (expected the columns {', '.join(COLUMNS)})") from None


def read_sink(run: str | Path) -> Sink:
    """The rows of a sink, up to its last complete line. Raises PlotError for unusable input."""
    path = find_sink(run)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PlotError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    partial = bool(data) and not data.endswith(b"\n")
    if partial:  # a writer is mid-line: keep only complete lines
        data = data[: data.rfind(b"\n") + 1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PlotError(f"{str(path)!r} is not a probe sink (not UTF-8 text)") from None
    rows = []
    if path.suffix.lower() == ".csv":
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            raise PlotError(f"{str(path)!r} is empty: no probe rows recorded yet")
        if tuple(header) != COLUMNS:
            raise PlotError(f"{str(path)!r} is not a probe sink: its header is not {','.join(COLUMNS)}")
        for i, rec in enumerate(reader, start=2):
            if len(rec) != len(COLUMNS):
                raise PlotError(f"{str(path)!r} line {i} is not a probe row ({len(rec)} fields)")
            rows.append(_row(dict(zip(COLUMNS, rec)), f"{str(path)!r} line {i}"))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                raise PlotError(f"{str(path)!r} line {i} is not JSON: not a probe sink") from None
            if not isinstance(raw, dict):
                raise PlotError(f"{str(path)!r} line {i} is not a probe row")
            rows.append(_row(raw, f"{str(path)!r} line {i}"))
    if not rows:
        raise PlotError(f"{str(path)!r} is empty: no probe rows recorded yet")
    return Sink(path, rows, partial)


def guess_placement(sink_path: Path) -> tuple[str | None, str]:
    """(placement, where it came from) from files beside the sink: the train job's train.json, the
    Trainer callback's probe_run.json; (None, reason) when nothing says."""
    folder = sink_path.parent
    for name in ("train.json", "probe_run.json"):
        f = folder / name
        if f.is_file():
            try:
                meta = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            placement = (meta.get("spec") or {}).get("placement") or meta.get("placement")
            if placement:
                return placement, f"from {name}"
    return None, "no train.json or probe_run.json beside the sink; pass --placement"


# ---- tables the plots draw --------------------------------------------------------------


def series(rows: Sequence[dict], metric: str, sublayer: str = "block") -> dict[tuple[str, str], dict[int, dict[int, float]]]:
    """{(stack, stream): {step: {layer: value}}} of one per-block metric."""
    out: dict[tuple[str, str], dict[int, dict[int, float]]] = {}
    for r in rows:
        if r["metric"] == metric and r["sublayer"] == sublayer:
            out.setdefault((r["stack"], r["stream"]), {}).setdefault(r["step"], {})[r["layer"]] = r["value"]
    return out


def chosen_steps(available: Sequence[int], wanted: Sequence[int] | None) -> list[int]:
    """`wanted` (each must have been recorded), or the first, middle and last recorded steps."""
    steps = sorted(set(available))
    if wanted:
        missing = [s for s in wanted if s not in set(steps)]
        if missing:
            raise PlotError(f"--steps: step {missing[0]} was not recorded for the forward statistics; "
                            f"recorded: {_ranges(steps)}")
        return sorted(set(wanted))
    return sorted({steps[0], steps[len(steps) // 2], steps[-1]})


def _ranges(steps: Sequence[int]) -> str:
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)} steps)"


def first_over_last(by_layer: dict[int, float]) -> float:
    """Block 0's value over the last block's (analysis' one ratio); NaN where it is not defined."""
    from ..analysis.summary import first_over_last as ratio

    values = [by_layer[k] for k in sorted(by_layer)]
    if len(values) < 2 or not all(math.isfinite(v) and v > 0 for v in (values[0], values[-1])):
        return math.nan
    return ratio(values)


def gradient_verdict(by_layer: dict[int, float]) -> dict:
    """First/last ratio, fitted per-block rate and the sentence, for one step's per-block norms."""
    from ..analysis.fits import FitError, geometric_decay
    from ..analysis.gradients import decay_verdict

    layers = sorted(by_layer)
    values = [by_layer[k] for k in layers]
    bad = [k for k in layers if not (math.isfinite(by_layer[k]) and by_layer[k] > 0)]
    if bad:
        return {"verdict": f"unknown: blocks {', '.join(map(str, bad[:5]))} have non-finite or zero gradient norms",
                "first_over_last": math.nan, "rate": math.nan}
    try:
        fit = geometric_decay(values, layers)
    except FitError as exc:
        return {"verdict": f"unknown: {exc}", "first_over_last": math.nan, "rate": math.nan}
    return {"verdict": decay_verdict(fit, len(layers)), "first_over_last": fit.first_over_last, "rate": fit.rate}


def collapse_verdict(by_layer: dict[int, float]) -> dict:
    from ..analysis.collapse import collapse_verdict

    return collapse_verdict([by_layer[k] for k in sorted(by_layer)])


# ---- the job -----------------------------------------------------------------------------


def run_plot(run: str | Path, out: str | Path, steps: Sequence[int] | None = None, placement: str | None = None,
             formats: Sequence[str] = ("png",)) -> dict:
    """Read the sink, draw the figures, write summary.json; returns the summary."""
    from ..plots import run as plots
    from ..output import prepare_out, write_json

    if placement is not None and placement not in PLACEMENTS:
        raise PlotError(f"--placement: unknown {placement!r}; choose from {', '.join(PLACEMENTS)}")
    sink = read_sink(run)
    rows = sink.rows
    if placement is None:
        placement, placement_source = guess_placement(sink.path)
    else:
        placement_source = "from --placement"
    out = prepare_out(out)

    grads = series(rows, "param_grad_norm")
    act = series(rows, "act_grad_norm")
    cos = series(rows, "cos_adjacent")
    infl = series(rows, "block_influence")
    metrics = sorted({r["metric"] for r in rows} - {"nonfinite_count"})
    recorded_steps = sorted({r["step"] for r in rows})
    wanted = {"param_grad_norm": "per-block gradient norms (grad_heatmap, grad_steps)",
              "act_grad_norm": "activation gradients (act_grad)",
              "cos_adjacent": "forward statistics (collapse)"}
    missing = [f"{m}: no {what}" for m, what in wanted.items() if m not in metrics]
    if not (grads or act or cos):
        raise PlotError(f"{str(sink.path)!r} holds none of {', '.join(wanted)}: nothing to draw")
    nonfinite = [r for r in rows if r["metric"] != "nonfinite_count" and not math.isfinite(r["value"])]

    fwd_steps = sorted({s for by_step in cos.values() for s in by_step}) or \
        sorted({s for by_step in act.values() for s in by_step})
    picked = chosen_steps(fwd_steps, steps) if fwd_steps else []

    files: list[Path] = []
    if grads:
        files += plots.grad_heatmap(grads, out / "grad_heatmap", formats)
        ratios = {key: (sorted(by_step), [first_over_last(by_step[s]) for s in sorted(by_step)])
                  for key, by_step in grads.items()}
        files += plots.grad_steps(grads, ratios, out / "grad_steps", formats)
    if act:
        act_steps = [s for s in picked if any(s in v for v in act.values())] or chosen_steps(
            sorted({s for v in act.values() for s in v}), None)
        files += plots.act_grad(act, act_steps, out / "act_grad", formats)
    reference = {key: key[1] in PRE_LN_STREAMS.get(placement or "", ()) for key in cos}
    if cos:
        files += plots.collapse(cos, infl, picked, reference, placement, out / "collapse", formats)

    verdicts = []
    for (stack, stream), by_step in grads.items():
        last = max(by_step)
        verdicts.append({"stack": stack, "stream": stream, "step": last, "quantity": "param_grad_norm",
                         **gradient_verdict(by_step[last])})
    collapse = []
    for (stack, stream), by_step in cos.items():
        last = max(by_step)
        collapse.append({"stack": stack, "stream": stream, "step": last, **collapse_verdict(by_step[last])})

    summary = {
        "job": "plot", "sink": str(sink.path), "rows": len(rows), "partial_last_line_skipped": sink.partial_line,
        "steps": {"first": recorded_steps[0], "last": recorded_steps[-1], "count": len(recorded_steps)},
        "stacks": {stack_label(s, st): len(next(iter(v.values()))) for (s, st), v in (grads or cos or act).items()},
        "metrics": metrics, "missing": missing, "placement": placement, "placement_source": placement_source,
        "collapse_reference_drawn_for": [stack_label(s, st) for (s, st), yes in reference.items() if yes],
        "chosen_steps": picked,
        "nonfinite": {"count": len(nonfinite), "first_step": min((r["step"] for r in nonfinite), default=None),
                      "metrics": sorted({r["metric"] for r in nonfinite})},
        "gradient_verdicts": verdicts, "collapse_verdicts": collapse,
        "files": [str(f) for f in files] + [str(out / "summary.json")],
    }
    write_json(out / "summary.json", summary)
    return summary
