"""The ResiDual paper's translation table at CPU scale, in a regime where its baselines hold.

The paper (Xie et al. 2023, IWSLT'14 De-En) trains E6D6 and E12D12 Transformers with Post-LN,
Pre-LN and ResiDual, with and without warm-up. This study runs that grid on a task 2 CPU cores
train in minutes (`task`: Pig Latin of CPython's documentation prose), at d 64, with the
released config's optimizer (Adam (0.9, 0.98), inverse-sqrt, weight decay 1e-4, label smoothing
0.1) through the project's one training loop.

The regime is chosen from the baselines alone, before any ResiDual run is read
(`analysis.regime`): dropout 0.1 (0.3, the released iwslt.yaml's value at d 256, stops Post-LN at d 64),
a 300-step warm-up ramp, 3000 steps, and the main peak lr = the largest of {1e-3, 2e-3} at which
Post-LN E6D6 with warm-up lands within 5 BLEU of Pre-LN (the gate; the paper: 0.25 apart). Stage
A (every E6D6 warm-up run, both lr arms, 3 seeds) starts with the four calibration runs; once
they finish the lr is fixed and stage B (E12D12, no warm-up, the alpha = 0 ablation; 2 seeds) is
queued. Every claim compares recipes with sacrebleu's paired bootstrap per seed pair and is
"yes"/"no" only when all seeds agree beyond the sentence noise (`analysis.significance`).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import numpy as np

from ...analysis import regime
from ...analysis.checks import Check
from .checks import (
    PAPER_BLEU,
    SOURCE_MARGIN,
    Cells,
    depth_checks,
    depth_gate,
    paper_checks,
    regime_checks,
    stream_checks,
)
from .runs import (
    CHAR_LR,
    CURVE_COLUMNS,
    PLACEMENTS,
    RunSpec,
    calibration,
    depth_gate_runs,
    depths,
    load_result,
    progress,
    read_rows,
    run_stages,
    stage_a,
    stage_b,
)
from .streams import stream_summary
from .task import DEFAULT_TASK, bigram_loss, heldout_clusters, references, unigram_loss


def main_lr(
    results: dict[str, dict], quick: bool, task: str = DEFAULT_TASK
) -> tuple[float, str] | None:
    """The regime's lr from the calibration runs (None until all of them finished); the character
    task takes the word task's (`runs.CHAR_LR`)."""
    if task != DEFAULT_TASK:
        return CHAR_LR, "the word task's main lr"
    cal: dict[float, dict[str, float]] = defaultdict(dict)
    for spec in calibration(quick, task):
        if spec.name not in results:
            return None
        cal[spec.lr][spec.placement] = results[spec.name]["bleu"]
    return regime.choose_lr(cal)


def task_gate(results: dict[str, dict], quick: bool, task: str) -> bool:
    """Whether stage B runs: always on the word task; on the character task only when the depth
    gate passed (Pre-LN deep beats shallow beyond the seed spread, `checks.depth_gate`)."""
    if task == DEFAULT_TASK:
        return True
    n0, n1 = depths(quick)
    bleu = {
        n: [
            results[s.name]["bleu"]
            for s in depth_gate_runs(quick, task)
            if s.depth == n and s.name in results
        ]
        for n in (n0, n1)
    }
    return depth_gate(bleu[n0], bleu[n1])


def finished(specs: Iterable[RunSpec], root: Path) -> dict[str, dict]:
    return {s.name: r for s in specs if (r := load_result(s, root)) is not None}


def run(
    out: Path,
    quick: bool = False,
    workers: int | None = None,
    echo=progress,
    train: bool = True,
    task: str = DEFAULT_TASK,
    cap: int | None = None,
) -> list[Check]:
    """Run (or resume) the grid into OUT/runs/translation/, then write tables, figures and checks.

    train=False writes them from the runs finished so far (a partial grid), training nothing.
    task: `task.TASKS`; a task other than the default writes everything under OUT/<task>/: its
    grid is the depth gate and, if the gate passes, ResiDual at both depths (`checks.depth_checks`).
    cap: the most steps of a run to the convergence rule (default `runs.MAX_STEPS`); runs finished
    at a lower cap go on from where they stopped.
    """
    import os

    out = Path(out) if task == DEFAULT_TASK else Path(out) / task
    root = out / "runs" / ("translation-quick" if quick else "translation")
    workers = workers or (1 if quick else min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    first = stage_a(quick, task, cap)

    def then(results: dict[str, dict]) -> list[RunSpec]:
        lr, why = main_lr(results, quick, task)
        echo(f"translation: main peak lr {lr:g} ({why})")
        if not task_gate(results, quick, task):
            echo("translation: the depth gate did not pass; ResiDual is not run on this task")
            return []
        return stage_b(quick, lr, task, cap)

    if train:
        results = run_stages(first, then, root, workers, echo, gate=first)
        log_wall(root, time.perf_counter() - t0, workers)
    else:
        results = finished(first, root)
        chosen = main_lr(results, quick, task)
        results.update(finished(stage_b(quick, chosen[0], task, cap), root) if chosen else {})
    chosen = main_lr(results, quick, task)
    if chosen is None or not any(s.name in results for s in first):
        echo("translation: the first stage has not finished; nothing to write")
        return []
    lr, why = chosen
    planned = first + (stage_b(quick, lr, task, cap) if task_gate(results, quick, task) else [])
    missing = [s.name for s in planned if s.name not in results]
    if missing:
        echo(
            f"translation: {len(missing)} of {len(planned)} runs not finished: {', '.join(missing)}"
        )
    specs = [s for s in planned if s.name in results]
    return write_results(out, specs, results, lr, why, quick, workers, missing, root)


def log_wall(root: Path, seconds: float, workers: int) -> None:
    """Append one training call's wall time to ROOT/wall.json: a resumed grid's wall time is the sum
    over its calls, and a --partial write (which trains nothing) still reports it."""
    from ...output import write_json

    root.mkdir(parents=True, exist_ok=True)
    write_json(
        root / "wall.json", logged_wall(root) + [dict(seconds=round(seconds, 1), workers=workers)]
    )


def logged_wall(root: Path) -> list[dict]:
    import json

    f = root / "wall.json"
    return json.loads(f.read_text()) if f.is_file() else []


def write_results(
    out: Path,
    specs: list[RunSpec],
    results: dict[str, dict],
    lr: float,
    why: str,
    quick: bool,
    workers: int,
    missing: list[str],
    root: Path,
) -> list[Check]:
    from ...output import write_csv, write_json

    data = specs[0].data()
    unigram, bigram = unigram_loss(data), bigram_loss(data)
    refs = references(data.heldout, data)
    clusters = heldout_clusters(data, specs[0].max_bytes)
    curves = {
        s.name: [
            {k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
            for r in read_rows(root / s.name / "curve.csv")
        ]
        for s in specs
    }
    # the calibration runs (a fixed 3000-step budget) choose the lr; the claims rest on the others
    task = specs[0].task
    cal_names = {s.name for s in calibration(quick, task)} if task == DEFAULT_TASK else set()
    cal_runs = [results[s.name] for s in specs if s.name in cal_names]
    cal_specs, specs = (
        [s for s in specs if s.name in cal_names],
        [s for s in specs if s.name not in cal_names],
    )
    cells = Cells([results[s.name] for s in specs], refs, bigram, unigram, clusters, curves)
    cal = Cells(cal_runs, refs, bigram, unigram, clusters, curves)

    runs = [run_row(s, results[s.name], cells, curves) for s in specs]
    table = table_rows(runs)
    write_csv(out / "translation_runs.csv", runs, list(runs[0]))
    write_csv(out / "translation_table.csv", table, list(table[0]))
    if cal_specs:
        write_csv(
            out / "translation_calibration.csv",
            [run_row(s, results[s.name], cal, curves) for s in cal_specs],
            list(runs[0]),
        )
    write_csv(
        out / "translation_curves.csv",
        [dict(run=n, **r) for n, rs in curves.items() for r in rs],
        ("run", *CURVE_COLUMNS),
    )
    probes = {s.name: read_rows(root / s.name / "probe.csv") for s in specs}
    streams = {
        s.name: read_rows(root / s.name / "streams.csv") for s in specs if s.placement == "residual"
    }
    # an extract of the probe logs (the full logs stay in runs/): the BLEU points (every bleu_every
    # steps) and the last recorded step, at the main lr, values to 6 significant digits, so the
    # committed table stays small (~1 MB for the full grid)
    probe_rows = []
    for s in specs:
        rs = probes[s.name]
        if rs and s.lr == lr and s.alpha == 1.0:
            last = max(int(r["step"]) for r in rs)
            probe_rows += [
                {"run": s.name, **r, "value": f"{float(r['value']):.6g}"}
                for r in rs
                if int(r["step"]) % s.bleu_every == 0 or int(r["step"]) == last
            ]
    write_csv(
        out / "translation_probe.csv",
        probe_rows,
        ("run", "step", "stack", "layer", "sublayer", "stream", "metric", "value"),
    )
    write_csv(
        out / "translation_streams.csv",
        [dict(run=n, **r) for n, rs in streams.items() for r in rs],
        ("run", "step", "stack", "layer", "quantity", "value"),
    )

    n0, n1 = depths(quick)
    size = (
        f"Pig Latin seq2seq{'' if task == DEFAULT_TASK else f' ({task})'}, d {specs[0].d_model}, "
        f"{specs[0].budget}, dropout {specs[0].dropout:g}"
    )
    if task == DEFAULT_TASK:
        checks, gate = regime_checks(cells, cal, curves, n0, lr, why, size)
        checks += paper_checks(cells, n0, n1, lr, f"{size}, main lr {lr:g}", gate)
    else:  # the word task is a lookup where depth cannot help; this one tests the depth claim
        checks, gate = depth_checks(cells, n0, n1, lr, f"{size}, lr {lr:g}"), True
    res_runs = {
        f"E{n}D{n}, warm-up, seed 0": RunSpec(
            "residual", n, True, lr=lr, seed=0, **_common(specs)
        ).name
        for n in (n0, n1)
    }
    summaries = {label: stream_summary(streams.get(name, [])) for label, name in res_runs.items()}
    checks += stream_checks(summaries, f"{size}, main lr {lr:g}")

    from .figures import draw

    draw(out, specs, table, runs, curves, probes, streams, lr, n0, n1, res_runs, gate)
    calls = logged_wall(root)
    write_hypotheses(out / "translation_hypotheses.csv.gz", specs, results, clusters)
    write_json(
        out / "translation.json",
        dict(
            study="translation",
            quick=quick,
            workers=workers,
            unigram_loss=unigram,
            bigram_loss=bigram,
            source_margin=SOURCE_MARGIN,
            # summed over the training calls logged in runs/ (resumed grids: several); None when
            # none was logged (grids trained before the log existed)
            wall_seconds=round(sum(c["seconds"] for c in calls), 1) if calls else None,
            wall_calls=calls,
            train_seconds_total=round(sum(results[s.name]["train_seconds"] for s in specs), 1),
            main_lr=lr,
            lr_rule=why,
            # the word task's regime gate; the character task's depth gate
            gate_passed=gate if task == DEFAULT_TASK else None,
            depth_gate_passed=None if task == DEFAULT_TASK else task_gate(results, quick, task),
            missing_runs=missing,
            sentences=dict(train=data.sentences[0], heldout=data.sentences[1]),
            units=dict(train=sum(map(len, data.train.values())), heldout=len(data.heldout)),
            runs={n: {k: v for k, v in r.items() if k != "hypotheses"} for n, r in results.items()},
        ),
    )
    return checks


def run_row(s: RunSpec, r: dict, cells: Cells, curves: dict[str, list[dict]]) -> dict:
    """One run's row of translation_runs.csv."""
    return dict(
        run=s.name,
        depth=s.depth,
        placement=s.placement,
        warmup="yes" if s.warmup else "no",
        lr=s.lr,
        alpha=s.alpha,
        seed=s.seed,
        heldout_loss=r["heldout_loss"],
        heldout_acc=r["heldout_acc"],
        shuffled_loss=r.get("shuffled_loss", math.nan),
        bleu=r["bleu"],
        failed="yes" if cells.failed(r) else "no",
        failed_bleu_rule="yes" if cells.failed_bleu(r) else "no",
        uses_source_from_step=_blank(cells.source_step(r)),
        steps_done=r["steps_done"],
        converged="yes" if r.get("converged") else "no",
        tail_improvement=regime.tail_improvement(curves[s.name]),
        diverged_at_step=_blank(r["diverged_at_step"]),
        train_seconds=r["train_seconds"],
    )


def _blank(v):
    """A CSV cell: the value, or empty for None."""
    return "" if v is None else v


def write_hypotheses(
    path: Path, specs: list[RunSpec], results: dict[str, dict], clusters: list[int]
) -> None:
    """Every run's final greedy decodes, one row per held-out unit with its sentence (cluster), gzip
    compressed: what a sentence-level bootstrap of any difference needs, kept with the results."""
    import csv
    import gzip
    import io

    from ...output import write_atomic

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(("run", "unit", "sentence", "hypothesis"))
    for s in specs:
        for i, h in enumerate(results[s.name]["hypotheses"]):
            w.writerow((s.name, i, clusters[i], h))
    write_atomic(path, gzip.compress(buf.getvalue().encode(), mtime=0))


def _common(specs: list[RunSpec]) -> dict:
    """The size fields every run shares (quick or full), to name a run of the grid."""
    s = asdict(specs[0])
    return {
        k: s[k]
        for k in (
            "steps",
            "warmup_steps",
            "d_model",
            "heads",
            "ffn",
            "batch",
            "eval_every",
            "bleu_every",
            "probe_every",
            "task",
            "min_steps",
        )
    }


def table_rows(runs: list[dict]) -> list[dict]:
    """Ours beside the paper's: one row per cell, means over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["depth"], r["placement"], r["warmup"], r["lr"], r["alpha"]].append(r)
    out = []

    def order(kv):
        (n, p, w, lr, alpha), _ = kv
        return n, w == "no", lr, alpha != 1.0, PLACEMENTS.index(p)

    for (n, p, w, lr, alpha), rs in sorted(groups.items(), key=order):
        bleu = np.array([r["bleu"] for r in rs])
        paper = PAPER_BLEU.get((n, p, w == "yes")) if alpha == 1.0 else None
        out.append(
            dict(
                model=f"E{n}D{n}",
                placement=p,
                warmup=w,
                lr=lr,
                alpha=alpha,
                seeds=len(rs),
                bleu_mean=float(bleu.mean()),
                bleu_sd=float(bleu.std(ddof=1)) if len(rs) > 1 else math.nan,
                bleu_per_seed=" ".join(f"{b:.2f}" for b in bleu),
                heldout_loss=float(np.mean([r["heldout_loss"] for r in rs])),
                heldout_acc=float(np.mean([r["heldout_acc"] for r in rs])),
                steps=" ".join(str(r["steps_done"]) for r in rs),
                levelled_off=sum(r["converged"] == "yes" for r in rs),
                failed=sum(r["failed"] == "yes" for r in rs),
                failed_bleu_rule=sum(r["failed_bleu_rule"] == "yes" for r in rs),
                paper_bleu="" if paper is None else paper,
            )
        )
    return out
