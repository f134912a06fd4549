"""Which rows each figure of the translation study shows; `plots.translation` draws them."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from .runs import PLACEMENTS, RunSpec


def profile(
    rows: Iterable[dict], metric: str, stack: str, stream: str = "x"
) -> dict[int, dict[int, float]]:
    """{step: {block: value}} of one probe metric (param_grad_norm: whole block)."""
    out: dict[int, dict[int, float]] = defaultdict(dict)
    for r in rows:
        if (
            r["metric"] == metric
            and r["stack"] == stack
            and r["stream"] in (stream, "-")
            and r["sublayer"] == "block"
        ):
            out[int(r["step"])][int(r["layer"])] = float(r["value"])
    return dict(out)


def first_last(prof: dict[int, dict[int, float]]) -> dict[int, float]:
    """Block 0's value over the last block's, per step (`curves.profile_ratio`)."""
    from ...analysis.curves import profile_ratio

    return {s: profile_ratio(v) for s, v in sorted(prof.items())}


def draw(
    out: Path,
    specs: list[RunSpec],
    table,
    runs,
    curves,
    probes,
    streams,
    lr: float,
    n0: int,
    n1: int,
    res_runs: dict[str, str],
    gate: bool,
) -> None:
    from ...plots.translation import (
        plot_bleu,
        plot_curves,
        plot_gradients,
        plot_influence,
        plot_streams,
    )

    size = f"d {specs[0].d_model}, {specs[0].budget}, dropout {specs[0].dropout:g}"
    note = "" if gate else " [gate failed: outside the paper's regime]"
    from .checks import PAPER_BLEU

    plot_bleu(table, runs, PAPER_BLEU, out / "translation_bleu")
    main = [s for s in specs if s.lr == lr and s.alpha == 1.0]
    spec_rows = {s.name: asdict(s) for s in main}
    from .checks import bleu_asymptote

    diverged = [r["run"] for r in runs if r["diverged_at_step"] != ""]
    capped = [r["run"] for r in runs if r["run"] in spec_rows and r["converged"] == "no"]
    capped = [n for n in capped if spec_rows[n]["min_steps"] and n not in diverged]
    fits = {n: bleu_asymptote(curves[n]) for n in capped}
    levels = {n: f.level for n, f in fits.items() if f is not None and f.identified}
    plot_curves(
        {s.name: curves[s.name] for s in main},
        spec_rows,
        out / "translation_curves",
        title=f"Held-out loss (teacher-forced, no label smoothing), peak lr {lr:g}{note}",
        diverged=diverged,
    )
    plot_curves(
        {s.name: curves[s.name] for s in main},
        spec_rows,
        out / "translation_bleu_curves",
        column="bleu",
        title=f"Held-out BLEU over training (greedy decodes of every held-out unit), peak lr {lr:g}"
        f"{note}\ndotted: the fitted level of a run that hit its cap, where the fit identifies it",
        levels=levels,
        diverged=diverged,
    )
    deep = {
        p: next(
            (
                s.name
                for s in main
                if s.depth == n1 and s.placement == p and s.warmup and s.seed == 0
            ),
            None,
        )
        for p in PLACEMENTS
    }
    profiles, influence = {}, {}
    for p, name in deep.items():
        for stack in ("encoder", "decoder"):
            prof = profile(probes.get(name, []), "param_grad_norm", stack)
            steps = sorted(prof)
            pick = (
                sorted({steps[0], steps[min(1, len(steps) - 1)], steps[len(steps) // 4], steps[-1]})
                if steps
                else []
            )
            profiles[f"{p} {stack}"] = {s: prof[s] for s in pick}
            for stream in ("x", "d") if p == "residual" else ("x",):
                inf = profile(probes.get(name, []), "block_influence", stack, stream)
                if inf:
                    influence.setdefault(p, {})[f"{stack} {stream}"] = inf[max(inf)]
    ratios = {
        f"{s.placement} {'warm-up' if s.warmup else 'no warm-up'} s{s.seed}": {
            st: first_last(profile(probes[s.name], "param_grad_norm", st))
            for st in ("encoder", "decoder")
        }
        for s in main
        if s.depth == n1
    }
    plot_gradients(
        profiles,
        ratios,
        f"E{n1}D{n1} during training ({size}, lr {lr:g}); profiles: warm-up, seed 0",
        out / "translation_grads",
    )
    plot_influence(
        influence,
        f"Block influence at the last recorded step, E{n1}D{n1}, warm-up, seed 0 "
        "(training batches, dropout on)",
        out / "translation_collapse",
    )
    plot_streams(
        {
            label: [r for r in streams.get(name, []) if r["stack"] == "decoder"]
            for label, name in res_runs.items()
            if streams.get(name)
        },
        out / "translation_streams",
    )
