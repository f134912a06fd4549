"""One training run of the translation study, and the grid of runs in two stages.

A run trains through the project's one training loop (`residual_probe.training.Trainer`): Adam
betas (0.9, 0.98), fairseq's inverse-sqrt schedule with or without its linear ramp, weight decay
and label smoothing as the paper's released IWSLT config. It records the probe during training,
the held-out loss and token accuracy every `eval_every` steps (and the held-out loss with sources
permuted between units, `task.shuffled_source_batches`: the control of whether it reads them), BLEU (greedy decodes of every
held-out unit) every `bleu_every` steps, and for ResiDual its two streams at the BLEU points.

Runs are resumable: a run writes ROOT/<name>/result.json last and is skipped when that file
holds the same spec. A run to the convergence rule also keeps its state at every BLEU point and
at its end (STATE): an interrupted run, or the same run given a higher cap, goes on from there
(`saved_state`) and equals the run trained in one go.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ...analysis import regime
from ...models.placements import PAPER_PLACEMENTS as PLACEMENTS
from .task import (
    DEFAULT_TASK,
    PigLatinBatches,
    heldout_batches,
    max_len,
    references,
    shuffled_source_batches,
    task_data,
    translate,
)

PROBE_METRICS = ("param_grad_norm", "act_grad_norm", "block_influence", "ln_update")
# a run's evaluations; runs trained before the shuffled-source control lack shuffled_loss
CURVE_COLUMNS = ("step", "lr", "train_loss", "heldout_loss", "heldout_acc", "shuffled_loss", "bleu")


@dataclass(frozen=True)
class RunSpec:
    """One translation run (encoder-decoder, E{depth}D{depth})."""

    placement: str
    depth: int
    warmup: bool  # with the linear warm-up ramp
    lr: float = 1e-3  # peak learning rate
    seed: int = 0
    steps: int = 3000
    warmup_steps: int = 300  # length of the ramp; the decay after it is the same with or without
    d_model: int = 64
    heads: int = 4
    ffn: int = 256
    batch: int = 32
    dropout: float = (
        0.1  # 0.3 in the released iwslt.yaml (d 256): at d 64 it stops Post-LN (docs/results.md)
    )
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    label_smoothing: float = 0.1
    weight_decay: float = 1e-4
    eval_every: int = 100
    bleu_every: int = 500
    probe_every: int = 10
    max_bytes: int = 32
    alpha: float = (
        1.0  # ResiDual's weight of x in alpha * x + LN_f(d); 0 is the ablation without the x term
    )
    task: str = DEFAULT_TASK  # `task.TASKS`: words as tokens, or characters (where depth matters)
    # 0: a fixed budget of `steps`. Else `steps` is a cap: train at least min_steps, then stop at
    # the first BLEU point where the convergence rule holds (`regime.converged`). The inverse-sqrt
    # schedule does not depend on the budget, so a run stopped at step s is the s-step run.
    min_steps: int = 0

    @property
    def name(self) -> str:
        return (
            f"E{self.depth}D{self.depth}-{self.placement}-{'warmup' if self.warmup else 'nowarmup'}"
            f"-lr{self.lr:g}-s{self.seed}"
            + ("" if self.alpha == 1.0 else f"-alpha{self.alpha:g}")
            + ("" if self.task == DEFAULT_TASK else f"-{self.task}")
            + ("-to-rule" if self.min_steps else "")
        )

    @property
    def budget(self) -> str:
        """The step budget in words, for titles and settings."""
        if self.min_steps:
            return f"{self.min_steps}-{self.steps} steps (to the convergence rule)"
        return f"{self.steps} steps"

    @property
    def cell(self) -> tuple:
        """The grid cell (all but the seed): runs of one cell are seeds of one recipe."""
        return (self.depth, self.placement, self.warmup, self.lr, self.alpha)

    def cost(self) -> float:
        """Relative compute, to start the longest runs first within a stage."""
        return self.depth * self.steps * self.batch * self.d_model**2

    def model_config(self):
        from ...models import ModelConfig

        # the paper's IWSLT model (ModelConfig.iwslt) at this width and depth
        data = self.data()
        return ModelConfig.iwslt(
            placement=self.placement,
            depth=self.depth,
            d_model=self.d_model,
            heads=self.heads,
            ffn=self.ffn,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            activation_dropout=self.activation_dropout,
            max_len=max(64, max_len(data)),  # 64 covers the word task; characters need more
            alpha=self.alpha,
            vocab_size=len(data.vocab),
        )

    def data(self):
        """The run's task (`task.task_data`)."""
        return task_data(self.max_bytes, task=self.task)


def same_spec(saved: dict | None, spec: RunSpec) -> bool:
    """A saved run's spec equals `spec`."""
    if saved is None:
        return False
    defaults = {f.name: f.default for f in fields(RunSpec) if f.default is not MISSING}
    return {**defaults, **saved} == asdict(spec)


def load_result(spec: RunSpec, root: Path) -> dict | None:
    """The finished run's result, or None (not run, or run with another spec)."""
    f = root / spec.name / "result.json"
    if f.is_file():
        res = json.loads(f.read_text())
        if same_spec(res.get("spec"), spec):
            return res
    return None


STATE = "state.pt"  # a run to the rule: model, optimizer, data stream and records at its last
# BLEU point, so that an interrupted run, or the same run given a higher cap, goes on from there


def saved_state(spec: RunSpec, run_dir: Path) -> dict | None:
    """The state this run goes on from: the same run to the rule (at this or a lower cap) saved at
    a BLEU point it reached; None to train from step 0."""
    import torch

    f = run_dir / STATE
    if not (spec.min_steps and f.is_file()):
        return None
    try:
        state = torch.load(f, weights_only=True)
    except Exception:  # cut off while written by an older version, or damaged: start over
        return None
    saved = state.get("spec") or {}
    if saved.get("steps", math.inf) <= spec.steps and same_spec(
        {**saved, "steps": spec.steps}, spec
    ):
        return state
    return None


def _as_tuples(x):
    """random.Random's state back from a checkpoint, which may hold its tuples as lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def read_rows(path: Path) -> list[dict]:
    """A run's CSV as rows of text (empty when the file is missing)."""
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def train_run(spec: RunSpec, run_dir: Path) -> dict:
    """Train, evaluate and record one run into run_dir; returns the result (also result.json)."""
    import torch

    from ...models import Transformer
    from ...output import write_atomic, write_csv, write_json
    from ...probe import Probe
    from ...training import Trainer
    from .streams import stream_diagnostics

    done = load_result(spec, run_dir.parent)
    if done is not None:
        return done
    state = saved_state(spec, run_dir)
    if state is not None and state["ended"] is not None:
        # it stopped before its cap (the rule held, or it diverged): a higher cap ends it there too
        done = {**state["ended"], "spec": asdict(spec)}
        write_json(run_dir / "result.json", done)
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    model = Transformer(spec.model_config())
    data = spec.data()
    train = PigLatinBatches(data, spec.batch, spec.seed)
    units = data.heldout  # every held-out unit: loss, accuracy and BLEU on the same sentences
    held, refs = heldout_batches(units, data, 64), references(units, data)
    shuffled, _ = shuffled_source_batches(held)  # one permutation for every evaluation
    stream_batch = max(held, key=lambda b: int((b.targets != -100).sum()))  # the most target tokens
    start = 0 if state is None else state["steps_done"]
    probe = Probe(
        model,
        quantities=("param_grad_norm", "act_grad_norm", "forward_stats"),
        every=spec.probe_every,
        start_step=start,
    )
    trainer = Trainer(
        model,
        probe,
        lr=spec.lr,
        warmup=spec.warmup_steps,
        ramp=spec.warmup,
        weight_decay=spec.weight_decay,
        label_smoothing=spec.label_smoothing,
    )
    curve, streams, losses, hyps = [], [], [], []
    earlier_rows, seconds_before = [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.steps_done = start
        train.rng.setstate(_as_tuples(state["data_rng"]))
        torch.set_rng_state(state["torch_rng"])
        curve, streams, losses, hyps = (
            state["curve"],
            state["streams"],
            state["losses"],
            state["hyps"],
        )
        earlier_rows, seconds_before = state["probe_rows"], state["seconds"]

    def probe_rows() -> list[dict]:
        """The probe rows a run keeps: its blocks' gradient norms and the forward statistics."""
        return earlier_rows + [
            r
            for r in probe.rows()
            if r["metric"] in PROBE_METRICS
            and (r["metric"] != "param_grad_norm" or r["sublayer"] == "block")
        ]

    def save(ended: dict | None = None) -> None:
        """The state at this BLEU point (`STATE`); `ended`: the result of a run that stopped."""
        if not spec.min_steps:
            return
        now = dict(
            spec=asdict(spec),
            steps_done=trainer.steps_done,
            model=model.state_dict(),
            optimizer=trainer.optimizer.state_dict(),
            data_rng=train.rng.getstate(),
            torch_rng=torch.get_rng_state(),
            curve=curve,
            streams=streams,
            losses=losses[-spec.eval_every :],
            hyps=hyps,
            probe_rows=probe_rows(),
            seconds=seconds_before + time.perf_counter() - t0,
            ended=ended,
        )
        write_atomic(run_dir / STATE, lambda tmp: torch.save(now, tmp))

    def record(step: int) -> None:
        """One evaluation: the held-out and shuffled-source losses (and accuracy)."""
        loss, acc = trainer.scores(held)
        curve.append(
            dict(
                step=step,
                lr=trainer.current_lr(),
                train_loss=float(np.mean(losses[-spec.eval_every :])) if losses else math.nan,
                heldout_loss=loss,
                heldout_acc=acc,
                shuffled_loss=trainer.scores(shuffled)[0],
                bleu=math.nan,
            )
        )

    def decode() -> None:
        """BLEU of greedy decodes at the last evaluation (and ResiDual's streams there)."""
        from .task import corpus_bleu

        model.eval()
        with probe.paused():
            hyps[:] = translate(model, units, data)
            if spec.placement == "residual":
                step = curve[-1]["step"]
                streams.extend(
                    dict(step=step, **r) for r in stream_diagnostics(model, stream_batch)
                )
        model.train()
        curve[-1]["bleu"] = corpus_bleu(hyps, refs)

    t0 = time.perf_counter()

    def after_step(step: int, lr: float, loss: float) -> bool:
        """Evaluate every eval_every steps; True (stop) once the convergence rule holds."""
        losses.append(loss)
        done = trainer.steps_done
        if not math.isfinite(loss) or (done % spec.eval_every and done != spec.steps):
            return False
        record(done)
        bleu_point = done % spec.bleu_every == 0 or done == spec.steps
        # the rule is checked at the BLEU points only: fewer looks, fewer stops on a blip
        stop = bleu_point and 0 < spec.min_steps <= done < spec.steps and regime.converged(curve)
        if bleu_point:
            decode()
            if not stop and done < spec.steps:
                save()  # where an interrupted run goes on from
        return stop

    with probe:
        model.train()
        if state is None:
            record(0)
            decode()
        # a state is saved at a BLEU point; the one at a lower cap was not checked against the rule
        stop = None
        if not (state is not None and spec.min_steps <= start and regime.converged(curve)):
            stop = trainer.run(train.next, spec.steps - start, after_step)
    diverged = None if stop is None else stop.step
    result = dict(
        spec=asdict(spec),
        name=spec.name,
        diverged_at_step=diverged,
        steps_done=trainer.steps_done,
        converged=regime.converged(curve),  # the rule held at the last evaluation
        train_seconds=round(seconds_before + time.perf_counter() - t0, 1),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    if diverged is None:
        last = curve[-1]
        result.update(
            heldout_loss=last["heldout_loss"],
            heldout_acc=last["heldout_acc"],
            shuffled_loss=last["shuffled_loss"],
            bleu=last["bleu"],
            hypotheses=list(hyps),
        )
    else:  # a diverged model decodes nothing: every hypothesis empty
        result.update(
            heldout_loss=math.nan,
            heldout_acc=math.nan,
            shuffled_loss=math.nan,
            bleu=0.0,
            hypotheses=[""] * len(units),
        )
    result["samples"] = [
        dict(source=u, reference=r, output=h)
        for u, r, h in list(zip(units, refs, result["hypotheses"]))[::40]
    ]
    write_csv(
        run_dir / "probe.csv",
        probe_rows(),
        ("step", "stack", "layer", "sublayer", "stream", "metric", "value"),
    )
    write_csv(
        run_dir / "curve.csv",
        curve,
        CURVE_COLUMNS,
    )
    if streams:
        write_csv(run_dir / "streams.csv", streams, ("step", "stack", "layer", "quantity", "value"))
    # what a higher cap goes on from: the run at its cap, or (stopped before it) its result
    save(None if trainer.steps_done == spec.steps and diverged is None else result)
    write_json(run_dir / "result.json", result)  # last: its presence marks the run finished
    return result


# ---- the grid, in two stages ----------------------------------------------------------------------

LRS = (1e-3, 2e-3)  # the peak-lr arms of the calibration (E6D6, warm-up)
SEEDS = (0, 1, 2)  # every cell a claim rests on
MIN_STEPS, MAX_STEPS = 3000, 6000  # a claim run trains to the convergence rule within these
CHAR_LR = 2e-3  # the character task reuses the word task's main lr (its calibration chose 2e-3)


def common(quick: bool, task: str = DEFAULT_TASK) -> dict:
    """The fields every run of a grid shares: the quick sizes, and the task."""
    if quick:
        return dict(
            task=task,
            d_model=16,
            heads=2,
            ffn=32,
            steps=20,
            warmup_steps=4,
            batch=8,
            eval_every=5,
            bleu_every=10,
            probe_every=5,
        )
    return dict(task=task)


def to_convergence(quick: bool, cap: int | None = None) -> dict:
    """The budget of a run a claim rests on: at least MIN_STEPS, then until the rule holds, at
    most `cap` steps (default MAX_STEPS; quick: 10 and 20). A run finished at a lower cap goes on
    from its saved state (`saved_state`)."""
    low, high = (10, 20) if quick else (MIN_STEPS, MAX_STEPS)
    return dict(min_steps=low, steps=cap or high)


def depths(quick: bool) -> tuple[int, int]:
    return (1, 2) if quick else (6, 12)


def calibration(quick: bool, task: str = DEFAULT_TASK) -> list[RunSpec]:
    """The baselines the regime is chosen from: Post-LN and Pre-LN, E6D6 (quick: E1D1), warm-up,
    each lr, seed 0, at the fixed budget the regime was first chosen at (3000 steps)."""
    n0 = depths(quick)[0]
    return [
        RunSpec(p, n0, True, lr=lr, seed=0, **common(quick, task))
        for lr in LRS
        for p in ("post-ln", "pre-ln")
    ]


def depth_gate_runs(quick: bool, task: str, cap: int | None = None) -> list[RunSpec]:
    """The character task's first runs: Pre-LN, warm-up, at both depths (the depth gate), each seed,
    to the convergence rule (`to_convergence`: the gate, too, is read where training levelled
    off), deep first."""
    n0, n1 = depths(quick)
    c = {**common(quick, task), **to_convergence(quick, cap), "lr": CHAR_LR}
    return [
        RunSpec("pre-ln", n, True, seed=s, **c)
        for s in SEEDS[: 1 if quick else 3]
        for n in (n1, n0)
    ]


def stage_a(quick: bool, task: str = DEFAULT_TASK, cap: int | None = None) -> list[RunSpec]:
    """The runs that do not wait for a gate: the word task's calibration (a fixed budget), or the
    character task's depth-gate runs (to the rule, at most `cap` steps)."""
    if task == DEFAULT_TASK:
        return calibration(quick, task)
    return depth_gate_runs(quick, task, cap)


def stage_b(
    quick: bool, lr: float, task: str = DEFAULT_TASK, cap: int | None = None
) -> list[RunSpec]:
    """The runs queued once stage A's gate runs finished, trained to convergence, in the order the
    claims need them (a grid cut short leaves whole cells): word task, at the main lr, the deep
    and shallow warm-up cells, the deep Post-LN, both depths without warm-up, the alpha = 0
    ablation; character task, ResiDual at both depths (`task_gate` decides whether they run)."""
    n0, n1 = depths(quick)
    seeds = SEEDS[:1] if quick else SEEDS
    c = {**common(quick, task), **to_convergence(quick, cap), "lr": lr}
    if task != DEFAULT_TASK:
        return [RunSpec("residual", n, True, seed=s, **c) for s in seeds for n in (n1, n0)]
    return (
        [RunSpec(p, n1, True, seed=s, **c) for s in seeds for p in ("pre-ln", "residual")]
        + [RunSpec(p, n0, True, seed=s, **c) for s in seeds for p in PLACEMENTS]
        + [RunSpec("post-ln", n1, True, seed=s, **c) for s in seeds]
        + [
            RunSpec(p, n, False, seed=s, **c)
            for n in (n0, n1)
            for s in seeds
            for p in ("pre-ln", "residual")
        ]
        + [RunSpec("residual", n0, True, seed=s, alpha=0.0, **c) for s in seeds]
    )


def _worker_init() -> None:
    import torch

    torch.set_num_threads(
        1
    )  # one core per run: two runs in parallel use two cores best at this size


def _run_in_worker(spec: RunSpec, run_dir: str) -> dict:
    return train_run(spec, Path(run_dir))


def progress(line: str) -> None:
    """The study's progress lines: stderr, so that stdout holds results only."""
    print(line, file=sys.stderr, flush=True)


def run_stages(
    first: list[RunSpec],
    then: Callable[[dict[str, dict]], list[RunSpec]],
    root: Path,
    workers: int = 1,
    echo=progress,
    gate: Iterable[RunSpec] = (),
) -> dict[str, dict]:
    """Run `first`, and as soon as the `gate` runs (a subset of `first`) have finished, queue
    `then(results so far)`; returns {name: result} of every run. `workers` processes in parallel."""
    gate_names = {s.name for s in gate}
    results: dict[str, dict] = {}
    total = len(first)

    def report(res: dict) -> None:
        results[res["name"]] = res
        echo(_progress(len(results), total, res))

    if workers <= 1:
        queue, added = list(first), False
        while queue:
            spec = queue.pop(0)
            report(train_run(spec, root / spec.name))
            if not added and gate_names <= set(results):
                more = then(results)
                total += len(more)
                queue += more
                added = True
        return results
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        pending = {pool.submit(_run_in_worker, s, str(root / s.name)) for s in first}
        added = False
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                report(fut.result())
            if not added and gate_names <= set(results):
                more = then(results)
                total += len(more)
                pending |= {pool.submit(_run_in_worker, s, str(root / s.name)) for s in more}
                added = True
    return results


def _progress(i: int, n: int, r: dict) -> str:
    return (
        f"[{i}/{n}] {r['name']}: held-out loss {r['heldout_loss']:.3f}, acc {r['heldout_acc']:.3f}, "
        f"BLEU {r['bleu']:.2f}, {r['train_seconds']:.0f} s"
        + (f", diverged at {r['diverged_at_step']}" if r["diverged_at_step"] is not None else "")
    )
