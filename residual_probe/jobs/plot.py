"""The `plot` job: the paper-style figures of any probe sink (a user's own run), and its verdicts.

RUN is a probe sink written by `Probe(sink=...)` in any loop, by the Hugging Face or Lightning
callbacks, or by the `train` job: a `.jsonl` or `.csv` file, or a folder holding one
(`probe.csv`, `probe.jsonl`). Lines are read up to the last complete one, so a sink that is
still being written can be drawn at any time.

Outputs in OUT:
- grad_heatmap.<fmt>   per-block gradient norm, layer x step, log colour scale (one panel per stack)
- grad_steps.<fmt>     first / median / last block gradient norm against step (vanishing as it develops)
- act_grad.<fmt>       activation-gradient norm per block at the chosen steps, per stream (when recorded)
- collapse.<fmt>       adjacent cosine and block influence per block at the chosen steps, with the
                       Pre-LN collapse reference where the stream is Pre-LN-like
- attention.<fmt>      largest attention logit per block against step (symmetric log axis, the
                       precursor limit 50) and mean attention entropy per block, a circle where a
                       block warned (when attn_logits was recorded)
- summary.json         what was found (steps, stacks, quantities present and missing, NaN/inf),
                       the last step's verdicts, the instability events (`instability_events`:
                       gradient excursions, analysis.instability), the precursor warnings before
                       them (`precursors`: a sibling list, each with its series in `metric`,
                       analysis.precursors) and the files written

Computations (ratios, fits, verdicts) come from `residual_probe.analysis`; the plots only draw.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..models.placements import PLACEMENTS, pre_ln_like
from ..probe.records import read_sink
from ..probe.scalars import stack_label

# Streams on which the Pre-LN collapse reference (ResiDual's toy model, cos = sqrt(k/(k+1))) applies:
# a stream that is never normalized and takes each update as x + F(LN(x)).


class PlotError(UserError):
    """Unusable input to `plot` (a sink without the quantities drawn, an unknown step); one line."""


def guess_placement(sink_path: Path) -> tuple[str | None, str, str | None]:
    """(placement, where it came from, why it is "other" or None) from files beside the sink: the
    train job's train.json, the Trainer callback's probe_run.json (its `placement_reason`, absent
    from files written before reasons existed); (None, reason, None) when nothing says."""
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
                return placement, f"from {name}", meta.get("placement_reason")
    return None, "no train.json or probe_run.json beside the sink; pass --placement", None


# ---- tables the plots draw --------------------------------------------------------------


def series(
    rows: Sequence[dict], metric: str, sublayer: str = "block"
) -> dict[tuple[str, str], dict[int, dict[int, float]]]:
    """{(stack, stream): {step: {layer: value}}} of one per-block metric."""
    out: dict[tuple[str, str], dict[int, dict[int, float]]] = {}
    for r in rows:
        if r["metric"] == metric and r["sublayer"] == sublayer:
            out.setdefault((r["stack"], r["stream"]), {}).setdefault(r["step"], {})[r["layer"]] = r[
                "value"
            ]
    return out


def chosen_steps(available: Sequence[int], wanted: Sequence[int] | None) -> list[int]:
    """`wanted` (each must have been recorded), or the first, middle and last recorded steps."""
    steps = sorted(set(available))
    if wanted:
        missing = [s for s in wanted if s not in set(steps)]
        if missing:
            raise PlotError(
                f"--steps: step {missing[0]} was not recorded for the forward statistics; "
                f"recorded: {_ranges(steps)}"
            )
        return sorted(set(wanted))
    return sorted({steps[0], steps[len(steps) // 2], steps[-1]})


def _ranges(steps: Sequence[int]) -> str:
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)} steps)"


# ---- the job -----------------------------------------------------------------------------


def run_plot(
    run: str | Path,
    out: str | Path,
    steps: Sequence[int] | None = None,
    placement: str | None = None,
    formats: Sequence[str] = ("png",),
) -> dict:
    """Read the sink, draw the figures, write summary.json; returns the summary."""
    from ..analysis.curves import profile_ratio
    from ..analysis.diagnosis import gradient_verdict
    from ..analysis.instability import find_events
    from ..analysis.precursors import ATTN_LOGIT_LIMIT, find_precursors
    from ..analysis.theory import collapse_prediction
    from ..analysis.verdicts import collapse_change, collapse_verdict
    from ..output import prepare_out, write_json
    from ..ownership import folder_state
    from ..plots import run as plots

    if placement is not None and placement not in PLACEMENTS:
        raise PlotError(f"--placement: unknown {placement!r}; choose from {', '.join(PLACEMENTS)}")
    sink = read_sink(run)
    rows = sink.rows
    notes = list(sink.notes)
    state = folder_state(sink.path.parent)
    if state:
        notes.insert(0, f"the run folder is {state}")
    reason = None
    if placement is None:
        placement, placement_source, reason = guess_placement(sink.path)
    else:
        placement_source = "from --placement"
    out = prepare_out(out)

    grads = series(rows, "param_grad_norm")
    act = series(rows, "act_grad_norm")
    cos = series(rows, "cos_adjacent")
    infl = series(rows, "block_influence")
    metrics = sorted({r["metric"] for r in rows} - {"nonfinite_count"})
    recorded_steps = sorted({r["step"] for r in rows})
    wanted = {
        "param_grad_norm": "per-block gradient norms (grad_heatmap, grad_steps)",
        "act_grad_norm": "activation gradients (act_grad)",
        "cos_adjacent": "forward statistics (collapse)",
    }
    missing = [f"{m}: no {what}" for m, what in wanted.items() if m not in metrics]
    if not (grads or act or cos):
        raise PlotError(f"{str(sink.path)!r} holds none of {', '.join(wanted)}: nothing to draw")
    nonfinite = [
        r for r in rows if r["metric"] != "nonfinite_count" and not math.isfinite(r["value"])
    ]

    fwd_steps = sorted({s for by_step in cos.values() for s in by_step}) or sorted(
        {s for by_step in act.values() for s in by_step}
    )
    picked = chosen_steps(fwd_steps, steps) if fwd_steps else []

    events = find_events(rows)
    precursors = find_precursors(rows)
    files: list[Path] = []
    if grads:
        files += plots.grad_heatmap(grads, out / "grad_heatmap", formats)
        ratios = {
            key: (sorted(by_step), [profile_ratio(by_step[s]) for s in sorted(by_step)])
            for key, by_step in grads.items()
        }
        marks = [(e.step, e.stack, e.layer) for e in events]
        files += plots.grad_steps(grads, ratios, out / "grad_steps", formats, marks)
    if act:
        act_steps = [s for s in picked if any(s in v for v in act.values())] or chosen_steps(
            sorted({s for v in act.values() for s in v}), None
        )
        files += plots.act_grad(act, act_steps, out / "act_grad", formats)
    # the Pre-LN toy model's adjacent cosine where the stream is Pre-LN-like (block k is the toy's k + 1)
    reference = {
        key: collapse_prediction("pre-ln", np.arange(1, 1 + max(len(v) for v in by_step.values())))[
            "cos_adjacent"
        ]
        if pre_ln_like(placement, key[1])
        else None
        for key, by_step in cos.items()
    }
    if cos:
        files += plots.collapse(cos, infl, picked, reference, placement, out / "collapse", formats)
    attn_max, entropy = series(rows, "attn_logit_max"), series(rows, "attn_entropy")
    if attn_max or entropy:
        marks = [(p.step, p.stack, p.layer, p.metric) for p in precursors if p.layer >= 0]
        files += plots.attention(
            attn_max, entropy, ATTN_LOGIT_LIMIT, out / "attention", formats, marks
        )

    verdicts = []
    for (stack, stream), by_step in grads.items():
        last = max(by_step)
        verdicts.append(
            {
                "stack": stack,
                "stream": stream,
                "step": last,
                "quantity": "param_grad_norm",
                **gradient_verdict([by_step[last][k] for k in sorted(by_step[last])]),
            }
        )
    collapse = []
    for (stack, stream), by_step in cos.items():
        first, last = min(by_step), max(by_step)
        per = {s: [by_step[s][k] for k in sorted(by_step[s])] for s in (first, last)}
        collapse.append(
            {
                "stack": stack,
                "stream": stream,
                "step": last,
                **collapse_verdict(per[last]),
                "since_start": collapse_change(per[first], per[last], first),
            }
        )

    summary = {
        "job": "plot",
        "sink": str(sink.path),
        "rows": len(rows),
        "partial_last_line_skipped": sink.partial_line,
        "notes": notes,
        "steps": {
            "first": recorded_steps[0],
            "last": recorded_steps[-1],
            "count": len(recorded_steps),
        },
        "stacks": {
            stack_label(s, st): len(next(iter(v.values())))
            for (s, st), v in (grads or cos or act).items()
        },
        "metrics": metrics,
        "missing": missing,
        "placement": placement,
        "placement_source": placement_source,
        "placement_reason": reason,  # why "other" (probe_run.json), else None
        "collapse_reference_drawn_for": [
            stack_label(s, st) for (s, st), ref in reference.items() if ref is not None
        ],
        "chosen_steps": picked,
        "nonfinite": {
            "count": len(nonfinite),
            "first_step": min((r["step"] for r in nonfinite), default=None),
            "metrics": sorted({r["metric"] for r in nonfinite}),
        },
        "gradient_verdicts": verdicts,
        "collapse_verdicts": collapse,
        "instability_events": [e.to_row() for e in events],
        "precursors": [p.to_row() for p in precursors],
        "files": [str(f) for f in files] + [str(out / "summary.json")],
    }
    write_json(out / "summary.json", summary)
    return summary
