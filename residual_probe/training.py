"""The one training loop: forward, loss, backward, probe, clip, optimizer step, schedule.

Every command that trains or takes gradients goes through `Trainer.step`: `grad-norms`
(at initialization and with `--steps`), `train`, `bounds` (one backward at initialization), and
the studies behind `figures`. A step is, in this order:

    lr <- schedule(step)                       # fairseq's linear warm-up, inverse-sqrt decay
    loss = cross_entropy(model(*inputs), targets); loss.backward()
    probe.step()                               # records gradients before clipping
    clip_grad_norm_(max_norm)                  # if clip > 0
    optimizer.step()                           # Adam, betas (0.9, 0.98) as fairseq; skipped if update=False

Validation (`Trainer.evaluate`) runs with the probe paused, so held-out batches never enter
the recorded statistics.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
import torch.nn.functional as F

BETAS = (0.9, 0.98)  # fairseq's Adam betas, which the ResiDual paper trained with
ADAM_EPS = 1e-8


def lr_schedule(step: int, lr: float, warmup: int) -> float:
    """Learning rate at `step` (0-based): linear warm-up over `warmup` steps, then inverse-square-root
    decay (fairseq's `inverse_sqrt`); `warmup` 0 gives a constant `lr`."""
    if warmup == 0:
        return lr
    return lr * min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))


def lm_loss(model, batch) -> torch.Tensor:
    """Mean token cross-entropy (nats) of `model(*batch.inputs)` against `batch.targets` (-100: no target)."""
    logits = model(*batch.inputs)  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100)


class Trainer:
    """Adam on `model` with the probe in the loop; `step()` is one optimizer step.

    probe: a `residual_probe.probe.Probe` already attached (or None); it is stepped after
    backward and before clipping, so it sees the raw accumulated gradient.
    """

    def __init__(self, model, probe=None, lr: float = 5e-4, warmup: int = 0, clip: float = 0.0):
        self.model, self.probe, self.lr, self.warmup, self.clip = model, probe, lr, warmup, clip
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS, eps=ADAM_EPS)
        self.steps_done = 0

    def current_lr(self) -> float:
        return lr_schedule(self.steps_done, self.lr, self.warmup)

    def step(self, batch, update: bool = True) -> torch.Tensor:
        """Forward, backward, probe, clip and (if `update`) one Adam step; returns the detached loss.

        `update=False` takes and records the gradient without changing the model: the
        measurement at initialization, or the last recording after the final update.
        """
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(self.model, batch)
        loss.backward()
        if self.probe is not None:
            self.probe.step()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if update:
            self.optimizer.step()
            self.steps_done += 1
        return loss.detach()

    def evaluate(self, batches: Iterable) -> float:
        """Mean loss over `batches` in eval mode, without gradients, with the probe paused."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.probe.paused() if self.probe is not None else contextlib.nullcontext(), torch.no_grad():
                losses = [float(lm_loss(self.model, b)) for b in batches]
        finally:
            self.model.train(was_training)
        return sum(losses) / len(losses)
