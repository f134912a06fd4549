"""Training study on CPU: post-ln / pre-ln / residual, with and without learning-rate warm-up.

Corpus: CPython's documentation topics (`pydoc_data.topics`, ~466 KB of English prose and
grammar), byte-level: it ships with every CPython, so the study runs offline on any machine,
and it is real text rather than random tokens. Each run trains a deep, narrow decoder-only LM
(full: 24 blocks, d_model 128) with Adam through `residual-probe train`'s job, recording
per-layer gradient norms; the final checkpoint is reloaded and measured for collapse.

Confronts: Post-LN fails to train deep without warm-up; Pre-LN trains but its later layers add
little; ResiDual trains in both settings. Writes figures/training_study_{loss,collapse,grads}.png
and training_study.csv; the runs themselves go to OUT/runs/ (not committed).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..analysis.checks import Check, agreement, fmt
from ..analysis.curves import loss_curves, ratio_by_step
from ..analysis.verdicts import (
    COLLAPSING_RATIO,
    VANISHING_FACTOR,
    VANISHING_RATIO,
    is_vanishing,
)
from ..jobs.train import TrainSpec, run_train
from ..models.placements import PAPER_PLACEMENTS as PLACEMENTS
from ..output import write_csv
from . import held_out_forward_stats


def settings(quick: bool) -> dict:
    if quick:
        return dict(
            depth=6,
            d_model=32,
            heads=2,
            ffn=64,
            batch=8,
            seq_len=32,
            steps=40,
            lr=2e-3,
            probe_every=5,
            eval_every=20,
        ), 10
    return dict(
        depth=24,
        d_model=128,
        heads=4,
        ffn=512,
        batch=16,
        seq_len=64,
        steps=600,
        lr=1e-3,
        probe_every=10,
        eval_every=50,
    ), 100


def collapse_profile(run_dir: Path) -> dict[int, float]:
    """Block influence (1 - adjacent cosine) per layer of the saved final checkpoint on held-out text."""
    from ..checkpoints import load_model

    rows = held_out_forward_stats(load_model(run_dir / "model"), batch=16, seq_len=64, seed=123)
    return {r["layer"]: r["value"] for r in rows if r["metric"] == "block_influence"}


def grad_ratio_by_step(run_dir: Path) -> dict[int, float]:
    """First-block / last-block parameter-gradient norm at each recorded step, from the run's sink."""
    from ..probe.records import read_sink

    df = read_sink(run_dir).frame()
    df = (
        df[df["metric"] == "param_grad_norm"]
        .rename(columns={"value": "param_grad_norm"})
        .assign(seed=0)
    )
    ratios = ratio_by_step(df, by=())
    return dict(zip(ratios["step"].tolist(), ratios["first_over_last"].tolist()))


def run(out: Path, quick: bool = False) -> list[Check]:
    from ..plots.training import plot_losses
    from ..plots.training_study import plot_collapse_profiles, plot_ratio_curves

    size, warm = settings(quick)
    runs, summary = {}, []
    placements, dashed = {}, set()  # run label -> placement; the runs without warm-up
    for placement in PLACEMENTS:
        for warmup in (0, warm):
            name = f"{placement} {'warm-up ' + str(warmup) if warmup else 'no warm-up'}"
            run_dir = out / "runs" / f"{placement}-warmup{warmup}"
            meta = run_train(
                TrainSpec(placement=placement, warmup=warmup, **size), run_dir, draw=False
            )
            ratios = grad_ratio_by_step(run_dir)
            influence = collapse_profile(run_dir)
            layers = sorted(influence)
            half = len(layers) // 2
            runs[name] = dict(dir=run_dir, ratios=ratios, influence=influence)
            placements[name] = placement
            if not warmup:
                dashed.add(name)
            summary.append(
                {
                    "placement": placement,
                    "warmup": warmup,
                    "final_val_loss": meta["final_val_loss"],
                    "diverged_at_step": meta["diverged_at_step"],
                    "wall_seconds": meta["wall_seconds"],
                    "grad_ratio_first_step": next(iter(ratios.values())),
                    "grad_ratio_last_step": list(ratios.values())[-1],
                    "influence_lower_half": float(np.mean([influence[k] for k in layers[:half]])),
                    "influence_upper_half": float(np.mean([influence[k] for k in layers[half:]])),
                }
            )
    write_csv(out / "training_study.csv", summary, list(summary[0]))
    plot_losses(
        loss_curves({n: r["dir"] / "loss.csv" for n, r in runs.items()}),
        out / "training_study_loss",
        placements,
        dashed,
        title=f"{size['depth']}-block decoder LM on pydoc topics (bytes)",
    )
    plot_collapse_profiles(
        {n: r["influence"] for n, r in runs.items()},
        out / "training_study_collapse",
        placements,
        dashed,
    )
    plot_ratio_curves(
        {n: r["ratios"] for n, r in runs.items()}, out / "training_study_grads", placements, dashed
    )
    return summary_checks(summary, quick)


def summary_checks(summary: list[dict], quick: bool = False) -> list[Check]:
    """The study's claims against its summary table (training_study.csv: one row per placement and
    warm-up, read back as numbers), so the checks can be recomputed without retraining."""
    size, _ = settings(quick)
    summary = [
        {
            k: (
                float(v)
                if k not in ("placement", "diverged_at_step") and v not in ("", None)
                else v
            )
            for k, v in r.items()
        }
        for r in summary
    ]
    s = {(r["placement"], r["warmup"] > 0): r for r in summary}
    uniform = math.log(256)  # loss of a uniform guess over bytes, nats
    trained = {k: v["final_val_loss"] < uniform - 1.0 for k, v in s.items()}
    where = f"decoder LM N={size['depth']}, d={size['d_model']}, {size['steps']} steps, lr {size['lr']:g}"
    post, post_w = s["post-ln", False], s["post-ln", True]
    return [
        Check(
            "Post-LN fails to train deep without warm-up",
            where,
            "post-ln",
            "held-out loss without warm-up > with warm-up + 0.2, or diverges",
            f"{fmt(post['final_val_loss'])} vs {fmt(post_w['final_val_loss'])} nats/byte",
            agreement(
                post["final_val_loss"] > post_w["final_val_loss"] + 0.2
                or not math.isfinite(post["final_val_loss"])
            ),
        ),
        Check(
            "Pre-LN trains without warm-up",
            where,
            "pre-ln",
            f"held-out loss < ln 256 - 1 = {fmt(uniform - 1)}; within 0.1 nats of its warm-up run (or better)",
            f"{fmt(s['pre-ln', False]['final_val_loss'])} vs {fmt(s['pre-ln', True]['final_val_loss'])} with warm-up",
            agreement(
                trained["pre-ln", False]
                and s["pre-ln", False]["final_val_loss"]
                <= s["pre-ln", True]["final_val_loss"] + 0.1
            ),
        ),
        Check(
            "Pre-LN's later layers add little (block influence 1 - cos)",
            where + ", warm-up",
            "pre-ln",
            "upper half < half the lower half",
            f"{fmt(s['pre-ln', True]['influence_upper_half'])} vs {fmt(s['pre-ln', True]['influence_lower_half'])}",
            agreement(
                s["pre-ln", True]["influence_upper_half"]
                < COLLAPSING_RATIO * s["pre-ln", True]["influence_lower_half"]
            ),
        ),
        Check(
            "ResiDual trains with and without warm-up",
            where,
            "residual",
            f"both held-out losses < {fmt(uniform - 1)}; without warm-up within 0.1 nats of with (or better)",
            f"{fmt(s['residual', False]['final_val_loss'])} / {fmt(s['residual', True]['final_val_loss'])}",
            agreement(
                trained["residual", False]
                and trained["residual", True]
                and s["residual", False]["final_val_loss"]
                <= s["residual", True]["final_val_loss"] + 0.1
            ),
        ),
        Check(
            "Post-LN develops vanishing gradients during training without warm-up",
            where,
            "post-ln",
            f"first/last block gradient ratio falls {VANISHING_FACTOR:g}x, below {VANISHING_RATIO:g}",
            f"{fmt(post['grad_ratio_first_step'])} -> {fmt(post['grad_ratio_last_step'])}",
            agreement(
                is_vanishing(post["grad_ratio_last_step"])
                and post["grad_ratio_last_step"] < post["grad_ratio_first_step"] / VANISHING_FACTOR
            ),
        ),
    ]
