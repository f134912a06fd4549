"""The one training loop: forward, loss, backward, probe, clip, optimizer step, schedule.

Every command that trains or takes gradients goes through `Trainer.step`: `grad-norms`
(at initialization and with `--steps`), `train`, `bounds` (one backward at initialization), and
the studies behind `figures`; `train` and the translation study run their steps through
`Trainer.run`, which stops at a non-finite loss. A step is, in this order:

    lr <- schedule(step)                       # fairseq's linear warm-up, inverse-sqrt decay
    loss = cross_entropy(model(*inputs), targets, label_smoothing)
           [+ z_loss * mean(logsumexp(logits)^2)]; loss.backward()
    probe.step()                               # records gradients before clipping
    clip_grad_norm_(max_norm)                  # if clip > 0
    optimizer.step()                           # Adam, betas (0.9, 0.98) as fairseq; skipped if update=False
    placement.after_step(stack, model)         # per stack, after an update (nGPT's unit-norm rows)

Validation (`Trainer.evaluate`, `Trainer.scores`) runs with the probe paused, so held-out
batches never enter the recorded statistics; its loss is never label-smoothed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F

BETAS = (0.9, 0.98)  # fairseq's Adam betas, which the ResiDual paper trained with
ADAM_EPS = 1e-8


DECAYS = ("inverse_sqrt", "constant")


def lr_schedule(
    step: int, lr: float, warmup: int, ramp: bool = True, decay: str = "inverse_sqrt"
) -> float:
    """Learning rate at `step` (0-based): linear warm-up over `warmup` steps, then inverse-square-root
    decay (fairseq's `inverse_sqrt`); `warmup` 0 gives a constant `lr`.

    ramp=False drops the linear ramp and keeps the decay after `warmup` steps (the ResiDual paper's
    "no warm-up" arm differs from its warm-up arm only in the ramp); decay="constant" keeps `lr`
    after the ramp.
    """
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; choose from {', '.join(DECAYS)}")
    if warmup == 0:
        return lr
    t = step + 1
    up = min(1.0, t / warmup) if ramp else 1.0
    down = min(1.0, math.sqrt(warmup / t)) if decay == "inverse_sqrt" else 1.0
    return lr * up * down


class Diverged(NamedTuple):
    """Where a run stopped: the step (0-based) whose loss was non-finite, its lr and loss."""

    step: int
    lr: float
    loss: float


def lm_losses(
    model, batch, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean token cross-entropy in nats of `model(*batch.inputs)` against `batch.targets` (-100: no
    target), the objective: that plus z_loss * mean over target tokens of
    (log Z)^2, log Z = logsumexp of the token's logits). The z-loss is PaLM's (Chowdhery et al.
    2022, Sec. 5: 1e-4), which Wortsman et al. 2023 show keeps the output logits from drifting;
    with z_loss 0 the objective is the cross-entropy itself."""
    logits = model(*batch.inputs)  # (B, T, vocab)
    targets = batch.targets.flatten()
    logits = logits.flatten(0, 1)
    ce = F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=label_smoothing)
    if not z_loss:
        return ce, ce
    kept = logits[targets != -100]
    log_z = torch.logsumexp(kept.to(torch.promote_types(kept.dtype, torch.float32)), -1)
    return ce, ce + z_loss * log_z.square().mean()


class Trainer:
    """Adam on `model` with the probe in the loop; `step()` is one optimizer step.

    probe: a `residual_probe.probe.Probe` already attached (or None); it is stepped after
    backward and before clipping, so it sees the raw accumulated gradient.
    """

    def __init__(
        self,
        model,
        probe=None,
        lr: float = 5e-4,
        warmup: int = 0,
        clip: float = 0.0,
        ramp: bool = True,
        decay: str = "inverse_sqrt",
        weight_decay: float = 0.0,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        betas: tuple[float, float] = BETAS,
    ):
        """betas: Adam's; fairseq's (0.9, 0.98) by default, (0.9, 0.95) in the instability study as
        Wortsman et al. 2023 and most LM recipes."""
        lr_schedule(0, lr, warmup, ramp, decay)  # an unknown decay fails here, before any step
        if not (z_loss >= 0 and math.isfinite(z_loss)):
            raise ValueError(f"z_loss: must be a number >= 0, got {z_loss}")
        self.model, self.probe, self.lr, self.warmup, self.clip = model, probe, lr, warmup, clip
        self.ramp, self.decay, self.label_smoothing = ramp, decay, label_smoothing
        self.z_loss = z_loss  # coefficient of PaLM's z-loss (`lm_losses`); 0: none
        # weight decay as fairseq's Adam applies it: added to the gradient (L2), not decoupled
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=lr, betas=betas, eps=ADAM_EPS, weight_decay=weight_decay
        )
        self.steps_done = 0

    def current_lr(self) -> float:
        return lr_schedule(self.steps_done, self.lr, self.warmup, self.ramp, self.decay)

    def step(self, batch, update: bool = True) -> torch.Tensor:
        """Forward, backward, probe, clip and (if `update`) one Adam step; returns the detached
        cross-entropy (without the z-loss term, so that runs with and without it compare).

        `update=False` takes and records the gradient without changing the model: the
        measurement at initialization, or the last recording after the final update.
        """
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, objective = lm_losses(self.model, batch, self.label_smoothing, self.z_loss)
        objective.backward()
        if self.probe is not None:
            self.probe.step()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if update:
            self.optimizer.step()
            for _, stack in self.model.stacks():
                stack.placement.after_step(stack, self.model)
            self.steps_done += 1
        return loss.detach()

    def run(
        self,
        next_batch: Callable[[], object],
        steps: int,
        after_step: Callable[[int, float, float], bool | None] | None = None,
    ) -> Diverged | None:
        """Up to `steps` optimizer steps on `next_batch()`; after each, `after_step(step, lr, loss)`
        (step 0-based, the lr it trained with, its loss in nats: one host sync per step), which
        evaluates, logs or saves as the caller needs, and returns True to stop here (a run that
        trains until a convergence rule holds). Stops after the first non-finite loss and
        returns where (None: every loss was finite): a diverged model has nothing more to say."""
        for step in range(steps):
            lr = self.current_lr()
            loss = float(self.step(next_batch()))
            stop = after_step(step, lr, loss) if after_step is not None else False
            if not math.isfinite(loss):
                return Diverged(step, lr, loss)
            if stop:
                return None
        return None

    def evaluate(self, batches: Iterable) -> float:
        """Mean loss per target token over `batches` (nats, no label smoothing); see `scores`."""
        return self.scores(batches)[0]

    def scores(self, batches: Iterable) -> tuple[float, float]:
        """`score_batches` of the model with the probe paused."""
        with self.probe.paused() if self.probe is not None else contextlib.nullcontext():
            return score_batches(self.model, batches)


def score_batches(model: torch.nn.Module, batches: Iterable) -> tuple[float, float]:
    """(loss in nats per target token, token accuracy) over `batches`, teacher-forced, in eval
    mode, without gradients: every target token counts once (the sum over all batches divided by
    their token count, not a mean of batch means). The one held-out scorer, so that controls
    scored on other batches (the translation study's shuffled sources) are comparable."""
    was_training = model.training
    model.eval()
    total, correct, n = 0.0, 0, 0
    try:
        with torch.no_grad():
            for b in batches:
                logits = model(*b.inputs)
                mask = b.targets != -100
                total += float(F.cross_entropy(logits[mask], b.targets[mask], reduction="sum"))
                correct += int((logits[mask].argmax(-1) == b.targets[mask]).sum())
                n += int(mask.sum())
    finally:
        model.train(was_training)
    return total / n, correct / n
