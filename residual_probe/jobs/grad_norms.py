"""The `grad-norms` job: per-layer gradient norms of reference models, per placement and seed.

For each (placement, seed) it builds a fresh reference Transformer, draws seeded batches, and
records every block's parameter-gradient norm (whole block and per sublayer) at step 0 and,
with `steps > 0`, after each of N Adam steps. Writes grad_norms.csv (tidy), grad_norms.json
(config, versions, seeds, wall times, summary) and the figure.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..models.placements import PAPER_PLACEMENTS
from .reference import ReferenceModel

CSV_COLUMNS = ("placement", "seed", "step", "stack", "layer", "sublayer", "param_grad_norm")


@dataclass
class GradNormsSpec(ReferenceModel):
    placements: tuple[str, ...] = PAPER_PLACEMENTS
    depth: int = 48
    seeds: int = 3
    steps: int = 0  # Adam steps; gradients are recorded before each and after the last
    lr: float = 5e-4
    warmup: int = 0  # linear warm-up steps, then inverse-sqrt decay (training.lr_schedule)
    data: str | None = None  # UTF-8 text file (byte tokens); None: synthetic task
    init: str = "fairseq"
    theory: bool = (
        False  # overlay the predicted per-layer curves and fit a decay rate per placement
    )
    force: bool = False  # run even when the memory estimate exceeds what the machine has free

    def model_config(self, placement: str):
        return self.build_config(placement=placement, depth=self.depth, init=self.init)

    def validate(self) -> None:
        """Fail before any work: every placement's config, and the run's own sizes."""
        from ..models import ConfigError

        for p in self.placements:
            self.model_config(p)
        if self.seeds < 1:
            raise ConfigError(f"seeds: must be >= 1, got {self.seeds}")
        if self.steps < 0 or self.warmup < 0:
            raise ConfigError(f"steps and warmup must be >= 0, got {self.steps} and {self.warmup}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: must be a positive number, got {self.lr}")


def record_run(
    spec: GradNormsSpec,
    placement: str,
    seed: int,
    text=None,
    on_step: Callable[[], None] | None = None,
):
    """Train/record one (placement, seed); returns (rows, losses). Rows follow CSV_COLUMNS.

    Gradients are recorded at every step 0..steps: before each Adam update and after the last.
    """
    import torch

    from ..data import BatchSource
    from ..models import Transformer
    from ..probe import Probe
    from ..training import Trainer

    torch.manual_seed(seed)
    cfg = spec.model_config(placement)
    model = Transformer(cfg)
    source = BatchSource(cfg.arch, spec.batch, spec.seq_len, cfg.vocab_size, seed, text)
    probe = Probe(model, quantities=("param_grad_norm",))
    trainer = Trainer(model, probe, lr=spec.lr, warmup=spec.warmup)
    rows, losses = [], []
    with probe:
        for step in range(spec.steps + 1):
            losses.append(trainer.step(source.next(), update=step < spec.steps))
            if on_step:
                on_step()
    for r in probe.rows():
        if r["metric"] == "param_grad_norm" and not r["sublayer"].startswith("group:"):
            rows.append(
                {
                    "placement": placement,
                    "seed": seed,
                    "step": r["step"],
                    "stack": r["stack"],
                    "layer": r["layer"],
                    "sublayer": r["sublayer"],
                    "param_grad_norm": r["value"],
                }
            )
    return rows, [float(v) for v in torch.stack(losses).tolist()]


def run_grad_norms(
    spec: GradNormsSpec, out: str | Path, formats=("png",), progress=None, echo=None
) -> dict:
    """Run every (placement, seed), write CSV + JSON + figure into `out`; returns the summary dict.

    `progress(total)` may return a callable advanced once per recorded step (a progress bar);
    `echo(line, err=...)` hears the memory estimate (budget.require), which refuses a run too big.
    """
    import pandas as pd

    from .. import budget
    from ..analysis.curves import ratio_by_step, seed_band
    from ..analysis.gradients import theory_overlay
    from ..data import read_text_tokens
    from ..output import prepare_out, versions, write_csv, write_json
    from ..plots.grad_norms import plot_grad_norms

    spec.validate()
    text = read_text_tokens(spec.data) if spec.data else None  # bad input: its one error line
    budget.require(budget.grad_norms_estimate(spec), spec.force, echo)  # before anything is built
    out = prepare_out(out)
    advance = progress(len(spec.placements) * spec.seeds * (spec.steps + 1)) if progress else None

    rows, losses, timings = [], {}, {}
    t_all = time.perf_counter()
    for placement in spec.placements:
        for seed in range(spec.seeds):
            t0 = time.perf_counter()
            r, loss = record_run(spec, placement, seed, text, advance)
            rows += r
            losses[f"{placement}/seed{seed}"] = loss
            timings[f"{placement}/seed{seed}"] = round(time.perf_counter() - t0, 3)
    wall = time.perf_counter() - t_all

    nonfinite = sum(1 for r in rows if not math.isfinite(r["param_grad_norm"]))
    csv_path = write_csv(out / "grad_norms.csv", rows, CSV_COLUMNS)
    df = pd.DataFrame(rows)
    block = df[df["sublayer"] == "block"]
    band = seed_band(block[block["step"] == spec.steps], by=["placement", "stack"])
    ratios = ratio_by_step(block)  # first/last block ratio per placement, stack and step
    title = (
        f"{spec.arch}, N = {spec.depth} blocks per stack, d = {spec.d_model}, {spec.init} init, "
        f"{spec.seeds} seed(s): line = geometric mean, band = min-max"
    )
    curves, verdicts = theory_overlay(df, step=spec.steps) if spec.theory else ([], [])
    if spec.theory:
        title += "\ndashed: theory through the last block (Post-LN path shape / flat floor); dotted: geometric fit"
    fig_paths = plot_grad_norms(
        band,
        out / "grad_norms",
        formats=formats,
        steps=spec.steps,
        ratios=ratios,
        curves=pd.DataFrame(curves) if curves else None,
        title=title,
    )
    meta = {
        "job": "grad-norms",
        "spec": asdict(spec),
        "model_configs": {p: spec.model_config(p).to_dict() for p in spec.placements},
        "seeds": list(range(spec.seeds)),
        "versions": versions(),
        "wall_seconds": round(wall, 3),
        "run_seconds": timings,
        "losses": losses,
        "nonfinite_values": nonfinite,
        "summary": ratios.to_dict("records"),
        "verdicts": verdicts,
        "files": [str(csv_path)] + [str(p) for p in fig_paths],
    }
    json_path = write_json(out / "grad_norms.json", meta)
    meta["files"].append(str(json_path))
    return meta
