"""Instability study on CPU: attention-logit growth over a learning-rate sweep, QK-norm, and the lead time of the precursor warnings.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities",
arXiv 2309.14322) reproduce at small scale what breaks large runs: at a high learning rate the
attention logits grow until the softmax saturates (attention-entropy collapse) and the loss ends
worse; QK-layernorm removes it. This study is their proxy at CPU scale: Pre-LN decoder LMs
(4 blocks, d 128, 4 heads, byte-level text of the built-in corpus, Adam betas (0.9, 0.95) without
weight decay, i.e. AdamW with decay 0, 20 linear warm-up steps then a constant lr) over a
log-spaced lr sweep, without and with QK-norm, 2 seeds. Each run goes through the project's one
training loop (`training.Trainer.run`) with the probe recording the gradient norms, the attention
logits and the output logits every PROBE_EVERY steps, and runs `PrecursorMonitor` and the
instability `Monitor` over them online, as `train` and the callbacks do.

Failure, defined before looking: a run fails when it diverges (a non-finite loss) or its final
held-out loss is above the best run's of the same seed by more than MARGIN nats. Its failure step
is the last evaluation at which its held-out loss is within MARGIN of the best run's curve at the
same step (the step at which it diverges, if earlier); the lead time is the failure step minus its
first precursor warning's step, in steps and as a share of the run (goal: at least 20 %). A run
that does not fail and raised a precursor is a false alarm. The thresholds are
`analysis.precursors`' (not tuned here).

Writes figures/instability_lr.png (final loss vs lr per variant), instability_logits.png (the
largest attention logit over blocks vs step per lr), instability.csv (one row per run) and
instability_lead.csv (one row per failing run) and instability_curves.csv (every run's held-out loss
at each evaluation and largest attention logit, smallest block entropy and mean log Z at each
recorded step); the runs themselves are not kept.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..analysis.checks import Check, agreement, fmt
from ..analysis.precursors import ATTN_LOGIT_LIMIT
from ..output import write_csv

MARGIN = 0.1  # nats of held-out loss above the best run's: a failing run
LEAD_GOAL = 0.2  # share of the run's steps a warning should come before the failure
VARIANTS = ("baseline", "qk-norm")
BETAS = (0.9, 0.95)  # Wortsman et al.'s AdamW betas


@dataclass(frozen=True)
class RunSpec:
    variant: str
    lr: float
    seed: int
    depth: int
    d_model: int
    heads: int
    ffn: int
    batch: int
    seq_len: int
    steps: int
    warmup: int
    probe_every: int
    eval_every: int

    @property
    def name(self) -> str:
        return f"{self.variant} lr {self.lr:g} seed {self.seed}"


def settings(quick: bool) -> tuple[dict, tuple[float, ...], tuple[int, ...]]:
    """(RunSpec fields other than variant, lr and seed; the lrs; the seeds)."""
    if quick:
        size = dict(depth=2, d_model=32, heads=2, ffn=64, batch=4, seq_len=32, steps=30)
        size.update(warmup=5, probe_every=2, eval_every=10)
        return size, (1e-3, 3e-2), (0,)
    size = dict(depth=4, d_model=128, heads=4, ffn=512, batch=16, seq_len=64, steps=300)
    size.update(warmup=20, probe_every=5, eval_every=10)
    return size, (1e-3, 3e-3, 1e-2, 3e-2), (0, 1)


def train_run(spec: RunSpec) -> dict:
    """Train one run; returns its held-out loss curve, the per-step largest attention logit, its
    precursor warnings and instability events (as rows), and its final loss."""
    import torch

    from ..data import BatchSource, builtin_corpus, split_tokens
    from ..models import ModelConfig, Transformer
    from ..probe import Probe
    from ..probe.scalars import InstabilityLog
    from ..training import Trainer

    torch.manual_seed(spec.seed)
    cfg = ModelConfig(
        arch="decoder",
        placement="pre-ln",
        depth=spec.depth,
        d_model=spec.d_model,
        heads=spec.heads,
        ffn=spec.ffn,
        qk_norm=spec.variant == "qk-norm",
        max_len=max(1024, spec.seq_len),
    )
    model = Transformer(cfg)
    train_text, val_text = split_tokens(builtin_corpus())
    source = BatchSource("decoder", spec.batch, spec.seq_len, cfg.vocab_size, spec.seed, train_text)
    val = [
        BatchSource(
            "decoder", spec.batch, spec.seq_len, cfg.vocab_size, 10_000 + i, val_text
        ).next()
        for i in range(4)
    ]  # the same held-out batches for every run
    # attn_logits on every recorded step: the precursor monitor's resolution (as `train`)
    probe = Probe(
        model,
        quantities=("param_grad_norm", "attn_logits", "output_logits"),
        every=spec.probe_every,
    )
    trainer = Trainer(model, probe, lr=spec.lr, warmup=spec.warmup, decay="constant", betas=BETAS)
    log, curve = InstabilityLog(), {}
    logit_max, entropy_min, log_z = {}, {}, {}

    def after(step: int, lr: float, loss: float) -> None:
        if step % spec.eval_every == 0 or step == spec.steps - 1 or not math.isfinite(loss):
            curve[step] = trainer.evaluate(val) if math.isfinite(loss) else math.nan

    with probe:
        model.train()
        stop = trainer.run(source.next, spec.steps, after)
        rows = probe.rows()
    log.update(rows)
    for r in rows:
        s, v = int(r["step"]), float(r["value"])
        if r["metric"] == "attn_logit_max" and r["sublayer"] == "block":
            logit_max[s] = max(logit_max.get(s, -math.inf), v)
        elif r["metric"] == "attn_entropy" and r["sublayer"] == "block":
            entropy_min[s] = min(entropy_min.get(s, math.inf), v)
        elif r["metric"] == "logit_z_mean":
            log_z[s] = v
    return {
        "spec": asdict(spec),
        "name": spec.name,
        "curve": curve,
        "diverged_at_step": None if stop is None else stop.step,
        "final_val_loss": curve[max(curve)],
        "logit_max": logit_max,
        "entropy_min": entropy_min,
        "log_z": log_z,
        "precursors": [p.to_row() for p in log.precursors.precursors],
        "events": [e.to_row() for e in log.monitor.events],
    }


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one core per run: two runs side by side use two cores best


def _progress(i: int, n: int, r: dict) -> None:
    """A finished run on stderr (progress, not a result)."""
    print(
        f"[{i}/{n}] {r['name']}: held-out loss {r['final_val_loss']:.3f}, "
        f"{len(r['precursors'])} precursor warning(s)",
        file=sys.stderr,
        flush=True,
    )


def run_all(specs: list[RunSpec], workers: int) -> list[dict]:
    """Every run in the order of `specs`, `workers` processes side by side (1: in this process)."""
    if workers <= 1:
        out = []
        for s in specs:
            out.append(train_run(s))
            _progress(len(out), len(specs), out[-1])
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(train_run, s): i for i, s in enumerate(specs)}
        done: dict[int, dict] = {}
        for fut in as_completed(futures):
            done[futures[fut]] = fut.result()
            _progress(len(done), len(specs), done[futures[fut]])
    return [done[i] for i in range(len(specs))]


# ---- failure, lead time, false alarms --------------------------------------------------------


def judge(runs: list[dict], margin: float = MARGIN) -> list[dict]:
    """One row per run: its final loss, whether it failed (diverged, or final held-out loss above
    its seed's best run's + margin), the failure step, its first precursor warning and first
    instability event, and the lead of each (steps and share of the run)."""
    best = {}
    for r in runs:
        seed = r["spec"]["seed"]
        if math.isfinite(r["final_val_loss"]) and (
            seed not in best or r["final_val_loss"] < best[seed]["final_val_loss"]
        ):
            best[seed] = r
    out = []
    for r in runs:
        s = r["spec"]
        ref = best[s["seed"]]["curve"]
        final = r["final_val_loss"]
        failed = r["diverged_at_step"] is not None or not final <= ref[max(ref)] + margin
        within = [
            step
            for step, v in sorted(r["curve"].items())
            if step in ref and math.isfinite(v) and v <= ref[step] + margin
        ]
        fail_step = (within[-1] if within else 0) if failed else None
        if failed and r["diverged_at_step"] is not None:
            fail_step = min(fail_step, r["diverged_at_step"])
        first = min(r["precursors"], key=lambda p: p["step"], default=None)
        event = min(r["events"], key=lambda e: e["step"], default=None)
        row = {
            "variant": s["variant"],
            "lr": s["lr"],
            "seed": s["seed"],
            "steps": s["steps"],
            "final_val_loss": final,
            "best_final_val_loss": best[s["seed"]]["final_val_loss"],
            "best_run": best[s["seed"]]["name"],
            "diverged_at_step": r["diverged_at_step"],
            "failed": failed,
            "failure_step": fail_step,
            "precursors": len(r["precursors"]),
            "first_precursor_step": first["step"] if first else None,
            "first_precursor": (
                f"{first['metric']} {first['stack']} block {first['layer']}" if first else ""
            ),
            "max_attn_logit": max(r["logit_max"].values(), default=math.nan),
            "min_attn_entropy": min(r["entropy_min"].values(), default=math.nan),
            "log_z_range": (
                max(r["log_z"].values()) - min(r["log_z"].values()) if r["log_z"] else math.nan
            ),
            "instability_events": len(r["events"]),
            "first_event_step": event["step"] if event else None,
        }
        for what, step in (
            ("lead", row["first_precursor_step"]),
            ("event_lead", row["first_event_step"]),
        ):
            lead = fail_step - step if failed and step is not None else None
            row[f"{what}_steps"] = lead
            row[f"{what}_share"] = lead / s["steps"] if lead is not None else None
        out.append(row)
    return out


CURVE_COLUMNS = (
    "variant",
    "lr",
    "seed",
    "step",
    "val_loss",
    "max_attn_logit",
    "min_attn_entropy",
    "logit_z_mean",
)


def curve_rows(runs: list[dict]) -> list[dict]:
    """One row per run and step that has a held-out loss or a recorded probe step (the other
    columns empty)."""
    out = []
    series = (
        ("val_loss", "curve"),
        ("max_attn_logit", "logit_max"),
        ("min_attn_entropy", "entropy_min"),
        ("logit_z_mean", "log_z"),
    )
    for r in runs:
        s = r["spec"]
        for step in sorted(set().union(*(r[key] for _, key in series))):
            row = {"variant": s["variant"], "lr": s["lr"], "seed": s["seed"], "step": step}
            row.update({col: r[key].get(step, "") for col, key in series})
            out.append(row)
    return out


def run(out: Path, quick: bool = False, workers: int | None = None) -> list[Check]:
    from ..plots.instability import plot_logits, plot_lr_sensitivity

    size, lrs, seeds = settings(quick)
    workers = workers or (1 if quick else min(2, os.cpu_count() or 1))
    specs = [
        RunSpec(variant=v, lr=lr, seed=seed, **size)
        for seed in seeds
        for lr in sorted(lrs, reverse=True)  # the slow high-lr runs first
        for v in VARIANTS
    ]
    runs = run_all(specs, workers)
    table = judge(runs)
    write_csv(out / "instability.csv", table, list(table[0]))
    lead_columns = [
        "variant",
        "lr",
        "seed",
        "final_val_loss",
        "best_final_val_loss",
        "diverged_at_step",
        "failure_step",
        "first_precursor_step",
        "first_precursor",
        "lead_steps",
        "lead_share",
        "first_event_step",
        "event_lead_steps",
        "event_lead_share",
    ]
    failing = [{k: r[k] for k in lead_columns} for r in table if r["failed"]]
    write_csv(out / "instability_lead.csv", failing, lead_columns)
    write_csv(out / "instability_curves.csv", curve_rows(runs), CURVE_COLUMNS)
    where = (
        f"Pre-LN decoder N={size['depth']}, d={size['d_model']}, {size['steps']} steps, "
        f"{len(seeds)} seed{'s' * (len(seeds) > 1)}"
    )
    plot_lr_sensitivity(table, MARGIN, out / "instability_lr", title=where)
    plot_logits(
        {(r["spec"]["variant"], r["spec"]["lr"], r["spec"]["seed"]): r["logit_max"] for r in runs},
        ATTN_LOGIT_LIMIT,
        out / "instability_logits",
    )
    return checks(table, where)


def checks(table: list[dict], where: str) -> list[Check]:
    """The study's claims against its per-run table (instability.csv)."""
    lrs = sorted({r["lr"] for r in table})
    high = lrs[-1]
    base = [r for r in table if r["variant"] == "baseline"]
    qk = [r for r in table if r["variant"] == "qk-norm"]
    base_high = [r for r in base if r["lr"] == high]
    qk_high = [r for r in qk if r["lr"] == high]
    best = min(
        table, key=lambda r: r["final_val_loss"] if math.isfinite(r["final_val_loss"]) else math.inf
    )

    def losses(rows):
        return " / ".join(fmt(r["final_val_loss"]) for r in rows)

    def logits(rows):
        return " / ".join(fmt(r["max_attn_logit"]) for r in rows)

    failing = [r for r in table if r["failed"]]
    above = [r for r in failing if r["lr"] > best["lr"]]  # too high an lr, not too low
    warned = [r for r in above if r["lead_share"] is not None]
    on_time = [r for r in warned if r["lead_share"] >= LEAD_GOAL]
    quiet = [r for r in table if not r["failed"]]
    alarms = [r for r in quiet if r["precursors"]]
    lead_text = "; ".join(
        f"{r['variant']} lr {r['lr']:g} s{r['seed']}: "
        + (
            f"warned at {r['first_precursor_step']}, failed at {r['failure_step']} "
            f"(lead {r['lead_steps']}, {r['lead_share']:.0%})"
            if r["lead_share"] is not None
            else f"no warning before failing at {r['failure_step']}"
        )
        for r in above
    )
    low = [r for r in failing if r["lr"] <= best["lr"]]
    both = [
        r
        for r in above
        if r["first_precursor_step"] is not None and r["first_event_step"] is not None
    ]
    return [
        Check(
            "Without QK-norm the highest lr shows attention-logit growth (a precursor)",
            f"{where}, lr {high:g}",
            "pre-ln",
            f"largest attention logit > {ATTN_LOGIT_LIMIT:g} in every seed",
            f"max logit {logits(base_high)}",
            agreement(all(r["max_attn_logit"] > ATTN_LOGIT_LIMIT for r in base_high)),
        ),
        Check(
            "Without QK-norm the highest lr ends worse than the best lr",
            f"{where}, lr {high:g}",
            "pre-ln",
            f"final held-out loss > the seed's best + {MARGIN:g} nats (best: {best['best_run']} "
            f"{fmt(best['final_val_loss'])})",
            f"{losses(base_high)} vs best {' / '.join(fmt(r['best_final_val_loss']) for r in base_high)}",
            agreement(all(r["failed"] for r in base_high)),
        ),
        Check(
            "With QK-norm the same lr trains: no logit growth, a lower loss than without",
            f"{where}, lr {high:g}",
            "pre-ln + QK-norm",
            f"largest attention logit <= {ATTN_LOGIT_LIMIT:g}, final loss below the baseline's "
            f"(within {MARGIN:g} of the best: reported)",
            f"max logit {logits(qk_high)}; loss {losses(qk_high)} vs {losses(base_high)} without; "
            f"{sum(not r['failed'] for r in qk_high)}/{len(qk_high)} within {MARGIN:g} of the best",
            agreement(
                all(r["max_attn_logit"] <= ATTN_LOGIT_LIMIT for r in qk_high)
                and all(
                    q["final_val_loss"] < b["final_val_loss"]
                    for q, b in zip(
                        sorted(qk_high, key=lambda r: r["seed"]),
                        sorted(base_high, key=lambda r: r["seed"]),
                    )
                )
            ),
        ),
        Check(
            f"Precursors warn at least {LEAD_GOAL:.0%} of the run before a high-lr failure",
            where,
            "both",
            f"every run failing above the best lr: first warning >= {LEAD_GOAL:.0%} of the steps "
            "before the failure step",
            f"{len(on_time)}/{len(above)} on time, {len(above) - len(warned)} without a warning"
            + (f" ({lead_text})" if lead_text else "")
            + (
                f"; {len(low)} run(s) failing below the best lr (too slow, not unstable) left out"
                if low
                else ""
            ),
            agreement(bool(above) and len(on_time) == len(above)),
        ),
        Check(
            "Precursors come before the gradient-excursion events (analysis.instability)",
            where,
            "both",
            "in every failing run above the best lr with both: first precursor step < first event step",
            (
                "; ".join(
                    f"{r['variant']} lr {r['lr']:g} s{r['seed']}: precursor {r['first_precursor_step']}, "
                    f"event {r['first_event_step']}"
                    for r in both
                )
                or "no run has both"
            )
            + f"; {sum(r['first_event_step'] is None for r in above)} of {len(above)} failing runs "
            "above the best lr had no gradient event",
            agreement(
                bool(both) and all(r["first_precursor_step"] < r["first_event_step"] for r in both)
            ),
        ),
        Check(
            "Precursors raise few false alarms",
            where,
            "both",
            "no precursor in a run that does not fail",
            f"{len(alarms)} of {len(quiet)} non-failing runs warned"
            + (
                " ("
                + ", ".join(
                    f"{r['variant']} lr {r['lr']:g} s{r['seed']}: {r['first_precursor']}"
                    for r in alarms
                )
                + ")"
                if alarms
                else ""
            ),
            agreement(not alarms),
        ),
    ]
