"""Every registered placement side by side: gradients at initialization (depths 6-48) and a short
training run without warm-up.

At initialization, an encoder-decoder per placement and depth (the ResiDual paper's setting,
where Post-LN's decoder gradients vanish): each stack's first/last block gradient ratio. Then
each placement trains the same small deep decoder LM on CPython's pydoc topics with and without
warm-up: held-out loss, the first/last gradient ratio at the end, the late blocks' adjacent
cosine (collapse), and, for hyper-connections, the mixing's Amax gain. The runs are short (a
trainability screen at one learning rate, one seed, not converged comparisons).

Confronts, where a source states what to expect: the per-block profile at init of the
placements whose source predicts one (`Placement.gradient_profile`); Post-LN needs warm-up and
Pre-LN does not (the baseline facts, first); DyT matches Pre-LN's loss (Zhu et al. 2025); ReZero
and T-Fixup train without warm-up (Bachlechner et al. 2021; Huang et al. 2020); mHC's gain stays
near 1 while HC's grows (Xie et al. 2026, Fig. 3). Writes all_placements_{init,training}.{png,csv};
the runs go to OUT/runs/all_placements/ (not committed).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..analysis.checks import Check, agreement, fmt
from ..analysis.curves import first_over_last, layer_table
from ..analysis.verdicts import VANISHING_RATIO, is_vanishing, late_cos
from ..jobs.grad_norms import GradNormsSpec, record_run
from ..jobs.train import TrainSpec, run_train
from ..models.placements import PLACEMENTS
from ..output import write_csv
from .training_study import grad_ratio_by_step

# A placement trains without warm-up when its held-out loss is within this of its own run with
# warm-up (nats/byte): the training study's rule.
TRAINS_MARGIN = 0.1
# DyT "matches" Pre-LN: the DyT paper reports LLaMA losses within ~0.01-0.02 of RMSNorm's
# (Zhu et al. 2025, Table 5); a short CPU run is noisier, so 0.05 nats/byte.
DYT_MARGIN = 0.05
GAIN_NEAR_ONE = 0.01  # mHC's Amax gain within 1 % of 1 (Sinkhorn's 20 rounds leave ~1e-6)
GAIN_GROWN = 1.5  # HC's gain "grows": above 1.5 after training (it is exactly 1 at init)
# --quick trains only the placements the checks name (the suite's budget); the full study all
QUICK_TRAINED = ("post-ln", "pre-ln", "dyt", "rezero", "tfixup", "hc", "mhc")


def settings(quick: bool) -> tuple[dict, dict, int]:
    """(init sizes with its depths, training sizes, warm-up steps of the references)."""
    if quick:
        init = dict(depths=(2, 3), d_model=16, heads=2, ffn=32, batch=2, seq_len=8)
        train = dict(depth=2, d_model=16, heads=2, ffn=32, batch=2, seq_len=16, steps=6)
        return init, {**train, "lr": 2e-3, "probe_every": 2, "eval_every": 3}, 2
    init = dict(depths=(6, 12, 24, 48), d_model=64, heads=4, ffn=256, batch=8, seq_len=32)
    train = dict(depth=12, d_model=32, heads=2, ffn=128, batch=8, seq_len=32, steps=600)
    return init, {**train, "lr": 2e-3, "probe_every": 10, "eval_every": 100}, 100


def init_rows(init: dict) -> list[dict]:
    """First/last block gradient ratio per placement, depth and stack of an encoder-decoder at
    initialization (seed 0)."""
    rows = []
    sizes = {k: v for k, v in init.items() if k != "depths"}
    for depth in init["depths"]:
        spec = GradNormsSpec(
            placements=tuple(PLACEMENTS), arch="seq2seq", depth=depth, seeds=1, **sizes
        )
        for p in PLACEMENTS:
            df = pd.DataFrame(record_run(spec, p, 0)[0])
            for stack, g in df[df["sublayer"] == "block"].groupby("stack"):
                ratio = first_over_last(layer_table(g))
                rows.append(
                    {"placement": p, "stack": stack, "depth": depth, "first_over_last": ratio}
                )
    return rows


def end_of_run(run_dir: Path) -> dict:
    """From a run's probe log, at its last recorded step: the late blocks' adjacent cosine (mean
    over the block's streams) and the hyper-connections' largest forward gain (NaN without)."""
    from ..probe.records import read_sink

    df = read_sink(run_dir).frame()
    cos = df[(df["metric"] == "cos_adjacent") & (df["sublayer"] == "block")]
    cos = cos[cos["step"] == cos["step"].max()].groupby("layer")["value"].mean().sort_index()
    gain = df[df["metric"] == "hc_gain_fwd"]
    gain = gain[gain["step"] == gain["step"].max()]["value"].max() if len(gain) else math.nan
    return {"late_cos_adjacent": late_cos(cos.tolist()), "hc_gain_fwd": float(gain)}


def training_rows(out: Path, train: dict, warm: int, quick: bool) -> list[dict]:
    rows = []
    for p in [p for p in PLACEMENTS if not quick or p in QUICK_TRAINED]:
        for warmup in (0, warm):
            run_dir = out / "runs" / "all_placements" / f"{p}-warmup{warmup}"
            meta = run_train(TrainSpec(placement=p, warmup=warmup, **train), run_dir, draw=False)
            ratios = grad_ratio_by_step(run_dir)
            rows.append(
                {
                    "placement": p,
                    "warmup": warmup,
                    "final_val_loss": meta["final_val_loss"],
                    "diverged_at_step": meta["diverged_at_step"],
                    "grad_ratio_last_step": list(ratios.values())[-1] if ratios else math.nan,
                    **end_of_run(run_dir),
                    "wall_seconds": meta["wall_seconds"],
                }
            )
    return rows


def run(out: Path, quick: bool = False) -> list[Check]:
    from ..plots.all_placements import plot_init_ratios, plot_training_summary

    init, train, warm = settings(quick)
    at_init = init_rows(init)
    write_csv(out / "all_placements_init.csv", at_init, list(at_init[0]))
    trained = training_rows(out, train, warm, quick)
    write_csv(out / "all_placements_training.csv", trained, list(trained[0]))
    where = f"decoder LM N={train['depth']}, d={train['d_model']}, {train['steps']} steps, lr {train['lr']:g}"
    plot_init_ratios(
        pd.DataFrame(at_init),
        out / "all_placements_init",
        title=f"encoder-decoder, d={init['d_model']}: first/last block gradient norm at init",
    )
    plot_training_summary(
        pd.DataFrame(trained),
        out / "all_placements_training",
        title=f"{where}; no warm-up (filled), warm-up {warm} steps (open)",
    )
    return init_checks(at_init, max(init["depths"])) + training_checks(trained, where)


def init_checks(rows: list[dict], depth: int) -> list[Check]:
    """Each placement whose source states a per-block profile at init, at the deepest depth."""
    checks = []
    for r in rows:
        profile = PLACEMENTS[r["placement"]].gradient_profile
        if r["depth"] != depth or r["stack"] != "decoder" or profile is None:
            continue
        ratio = float(r["first_over_last"])
        decays = profile == "decay"
        checks.append(
            Check(
                "gradients vanish toward the input at init"
                if decays
                else "gradients keep a floor toward the input at init",
                f"seq2seq decoder N={depth}",
                r["placement"],
                f"first/last {'<' if decays else '>='} {VANISHING_RATIO:g}",
                fmt(ratio),
                agreement(is_vanishing(ratio) == decays),
            )
        )
    return checks


def training_checks(rows: list[dict], where: str) -> list[Check]:
    """The sources' statements against the runs (all_placements_training.csv's rows)."""
    runs = {(r["placement"], int(r["warmup"]) > 0): r for r in rows}
    loss = {k: float(r["final_val_loss"]) for k, r in runs.items()}

    def trains(p: str) -> bool:  # without warm-up, as well as with it (the training study's rule)
        return math.isfinite(loss[p, False]) and loss[p, False] <= loss[p, True] + TRAINS_MARGIN

    checks = [
        Check(
            "Post-LN needs warm-up (baseline)",
            where,
            "post-ln",
            f"loss without warm-up > with warm-up + {TRAINS_MARGIN:g}, or diverges",
            f"{fmt(loss['post-ln', False])} vs {fmt(loss['post-ln', True])} nats/byte",
            agreement(
                not math.isfinite(loss["post-ln", False])
                or loss["post-ln", False] > loss["post-ln", True] + TRAINS_MARGIN
            ),
        ),
        Check(
            "Pre-LN trains without warm-up (baseline)",
            where,
            "pre-ln",
            f"loss without warm-up <= with warm-up + {TRAINS_MARGIN:g}",
            f"{fmt(loss['pre-ln', False])} vs {fmt(loss['pre-ln', True])} nats/byte",
            agreement(trains("pre-ln")),
        ),
    ]
    if ("dyt", False) in loss:
        checks.append(
            Check(
                "DyT matches Pre-LN's loss",
                where + ", no warm-up",
                "dyt",
                f"|DyT - Pre-LN| <= {DYT_MARGIN:g} nats/byte, or DyT lower",
                f"{fmt(loss['dyt', False])} vs {fmt(loss['pre-ln', False])}",
                agreement(loss["dyt", False] <= loss["pre-ln", False] + DYT_MARGIN),
            )
        )
    for p in ("rezero", "tfixup"):
        if (p, False) in loss:
            checks.append(
                Check(
                    "trains without warm-up",
                    where,
                    p,
                    f"loss without warm-up <= with warm-up + {TRAINS_MARGIN:g}",
                    f"{fmt(loss[p, False])} vs {fmt(loss[p, True])} nats/byte",
                    agreement(trains(p)),
                )
            )
    if ("hc", False) in runs and ("mhc", False) in runs:
        hc, mhc = float(runs["hc", False]["hc_gain_fwd"]), float(runs["mhc", False]["hc_gain_fwd"])
        checks.append(
            Check(
                "mHC's Amax gain stays near 1 while HC's grows",
                where + ", last recorded step",
                "mhc, hc",
                f"mHC within {GAIN_NEAR_ONE:g} of 1; HC above {GAIN_GROWN:g}",
                f"mHC {fmt(mhc, 4)}, HC {fmt(hc)}",
                agreement(abs(mhc - 1) <= GAIN_NEAR_ONE and hc > GAIN_GROWN),
            )
        )
    return checks
