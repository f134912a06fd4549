"""The `train` job: train a small deep reference model on real text, recording the probe as it goes.

Outputs in `out`, each usable even if the run is interrupted:
- loss.csv      step, lr, train_loss, val_loss (appended and flushed every step)
- probe.csv     the probe's rows (per-layer gradient norms and forward statistics), flushed as written
- model/        the final (or last, if interrupted) checkpoint: safetensors + config.json, which
                `residual-probe collapse --ckpt` reads
- train.json    the full config, versions, timings, final losses and whether it diverged
- loss.png      the loss curves
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..probe.schedule import FORWARD_EVERY
from .reference import ReferenceModel


@dataclass
class TrainSpec(ReferenceModel):
    """The run: the reference model (ReferenceModel's fields; the defaults that differ are here)
    and the training and recording options."""

    placement: str = "residual"
    arch: str = "decoder"
    depth: int = 24
    d_model: int = 128
    ffn: int = 512
    batch: int = 16
    seq_len: int = 64
    steps: int = 500
    lr: float = 1e-3
    warmup: int = 0  # linear warm-up steps; 0 = none (the setting where Post-LN is said to fail)
    seed: int = 0
    data: str | None = None  # UTF-8 text file; None: the built-in corpus (CPython's pydoc topics)
    probe_every: int = 10  # record the probe every n-th step
    forward_every: int = (
        FORWARD_EVERY  # forward statistics on every n-th recorded step, the first and the last
    )
    eval_every: int = 50  # validation loss every n-th step
    clip: float = 0.0  # gradient clipping max-norm; 0 = none (the probe records before clipping)
    z_loss: float = 0.0  # PaLM's z-loss coefficient (training.lm_losses); 0 = none
    force: bool = False  # run even when the memory estimate exceeds what the machine has free

    def model_config(self):
        return self.build_config(placement=self.placement, depth=self.depth)

    def validate(self) -> None:
        from ..models import ConfigError

        self.model_config()
        for name in (
            "steps",
            "warmup",
            "probe_every",
            "forward_every",
            "eval_every",
            "batch",
            "seq_len",
        ):
            if getattr(self, name) < (0 if name in ("steps", "warmup") else 1):
                raise ConfigError(f"{name}: out of range, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: must be a positive number, got {self.lr}")
        if not (self.z_loss >= 0 and math.isfinite(self.z_loss)):
            raise ConfigError(f"z_loss: must be a number >= 0, got {self.z_loss}")


PRECURSOR_QUANTITIES = ("attn_logits", "output_logits")  # the series analysis.precursors reads


def train_schedule(names: tuple[str, ...], spec: TrainSpec, last: int) -> dict:
    """{quantity: schedule}: every `probe_every`-th step; the forward statistics only every
    `forward_every`-th recorded step, the first and the last (schedule.FORWARD_EVERY); the
    precursor quantities (attention and output logits) on every recorded step, unlike the callbacks' default: the precursor warnings
    (`analysis.precursors`) need the series at the gradient norms' resolution to warn early, and
    at `train`'s sizes a dozen operator calls per attention module on one step in `probe_every`
    cost little."""
    from ..probe.quantities import REGISTRY
    from ..probe.schedule import sparse_forward

    sparse = [n for n in names if REGISTRY[n].sparse and n not in PRECURSOR_QUANTITIES]
    return sparse_forward(names, spec.probe_every, 0, spec.forward_every, sparse, last)


def probe_figures(out: Path, placement: str, meta: dict) -> list[Path]:
    """The gradient and collapse figures of the run's own probe log, as `residual-probe plot` draws
    them (grad_heatmap, grad_steps, act_grad, collapse and summary.json in OUT); a log with nothing
    to draw yet (interrupted before the first recording) is noted in train.json instead."""
    from ..errors import UserError
    from .plot import run_plot

    try:
        summary = run_plot(out / "probe.csv", out, placement=placement)
    except UserError as exc:  # no sink yet, or nothing to draw in it
        meta["probe_figures"] = f"not drawn: {exc}"
        return []
    meta["probe_figures"] = "drawn by residual-probe plot"
    meta["instability_events"] = summary["instability_events"]
    meta["precursors"] = summary["precursors"]
    return [Path(f) for f in summary["files"]]


def run_train(
    spec: TrainSpec, out: str | Path, progress=None, echo=None, draw: bool = True
) -> dict:
    """Train, record and save; returns the metadata written to train.json. `echo(line, err=...)`
    hears the memory estimate (budget.require), which refuses a run too big. `draw=False` leaves
    out the run's own figures (a study that draws its runs side by side; `residual-probe plot`
    draws one later from its probe.csv)."""
    import torch

    from .. import budget
    from ..analysis.curves import loss_curves
    from ..checkpoints import save_model
    from ..data import BatchSource, builtin_corpus, read_text_tokens, split_tokens
    from ..models import Transformer
    from ..output import prepare_out, versions, write_json
    from ..ownership import record_write
    from ..plots.training import plot_losses
    from ..probe import Probe
    from ..training import Trainer

    spec.validate()
    tokens = read_text_tokens(spec.data) if spec.data else builtin_corpus()  # bad input first
    budget.require(budget.train_estimate(spec), spec.force, echo)  # before anything is built
    out = prepare_out(out)
    train_text, val_text = split_tokens(tokens)
    torch.manual_seed(spec.seed)
    cfg = spec.model_config()
    model = Transformer(cfg)
    train = BatchSource(cfg.arch, spec.batch, spec.seq_len, cfg.vocab_size, spec.seed, train_text)
    val_batches = [
        BatchSource(cfg.arch, spec.batch, spec.seq_len, cfg.vocab_size, 10_000 + i, val_text).next()
        for i in range(4)
    ]  # fixed held-out batches: comparable across steps and runs
    names = (
        "param_grad_norm",
        "act_grad_norm",
        "w2_grad_norm",
        "forward_stats",
        "update_ratio",
        "attn_logits",  # attention-logit growth and entropy collapse (what --qk-norm prevents)
        "output_logits",  # log Z drift (what --z-loss prevents)
        "hc_mixing",  # hyper-connections' mixing gain over depth (hc, mhc; nothing otherwise)
    )
    last = (
        (spec.steps - 1) // spec.probe_every * spec.probe_every
    )  # the last recorded step: collapse at the end
    probe = Probe(model, quantities=train_schedule(names, spec, last), sink=out / "probe.csv")
    trainer = Trainer(
        model, probe, lr=spec.lr, warmup=spec.warmup, clip=spec.clip, z_loss=spec.z_loss
    )
    probe.track_optimizer(
        trainer.optimizer
    )  # update ratios: a block whose update blew up is an instability event
    advance = progress(spec.steps) if progress else None

    meta = {
        "job": "train",
        "spec": asdict(spec),
        "model_config": cfg.to_dict(),
        "versions": versions(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "interrupted": False,
        "diverged_at_step": None,
        "diverged": None,
    }
    t0 = time.perf_counter()
    with open(out / "loss.csv", "w", newline="") as fh:
        record_write(
            out / "loss.csv"
        )  # written line by line: listed in the manifest from the start
        writer = csv.writer(fh)
        writer.writerow(["step", "lr", "train_loss", "val_loss"])

        def log(step: int, lr: float, train_loss: float) -> None:
            is_eval = (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps
            writer.writerow(
                [step, lr, train_loss, trainer.evaluate(val_batches) if is_eval else ""]
            )
            fh.flush()
            if advance:
                advance()

        try:
            with probe:
                model.train()
                stop = trainer.run(train.next, spec.steps, log)
                if stop is not None:
                    meta["diverged_at_step"] = stop.step
                    meta["diverged"] = {
                        "step": stop.step,
                        "train_loss": str(stop.loss),
                        "lr": stop.lr,
                    }
        except KeyboardInterrupt:
            meta["interrupted"] = True
        finally:
            # steps_done: the rows loss.csv holds, counted there (an interrupt can land between a
            # row's write and any counter kept beside it), so the two always agree.
            fh.flush()
            with open(out / "loss.csv", newline="") as rows:
                meta["steps_done"] = sum(1 for _ in csv.reader(rows)) - 1
            # An interrupt can land between an Adam update and its loss.csv row: the saved model
            # then holds one update more than the rows show, and this says so.
            meta["model_updates"] = trainer.steps_done
            meta["wall_seconds"] = round(time.perf_counter() - t0, 3)
            meta["final_val_loss"] = (
                trainer.evaluate(val_batches) if meta["diverged_at_step"] is None else math.nan
            )
            save_model(model, out / "model")
            files = [out / "loss.csv", out / "probe.csv", out / "model"]
            if draw:
                files += plot_losses(
                    loss_curves({spec.placement: out / "loss.csv"}),
                    out / "loss",
                    placements={spec.placement: spec.placement},
                )
                files += probe_figures(out, spec.placement, meta)
            else:
                meta["probe_figures"] = "not drawn: residual-probe plot draws them from probe.csv"
            meta["files"] = [str(f) for f in files]
            write_json(out / "train.json", meta)
    if meta["interrupted"]:
        raise KeyboardInterrupt
    return meta
