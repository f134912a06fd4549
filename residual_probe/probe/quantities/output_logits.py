"""output_logits: the log-partition log Z of the output logits, and the largest logit.

Per recorded step, over every token of the training forwards (micro-batches pooled, and across
data-parallel ranks): `logit_z_mean` and `logit_z_max`, the mean and the largest over tokens of
log Z = logsumexp over the vocabulary of the token's logits, and `logit_max`, the largest logit.
log Z is what PaLM's z-loss (Chowdhery et al. 2022) pushes toward 0; Wortsman et al. 2023
(arXiv 2309.14322, Sec. 3.2) show it drifting far below 0 before a high-learning-rate run
diverges, and the z-loss (`train --z-loss`) keeping it near 0. Every token of the forward counts,
padding included: the head does not know the targets.

Where: a forward hook on the model's output head, `get_output_embeddings()` (Hugging Face) or
else the one Linear outside the blocks named as `params.HEAD_NAMES` says (`output_projection`,
`lm_head`, ...); Gemma 2's `final_logit_softcapping`, applied by the model after the head, is
applied here too, so the numbers are those of the model's output. Rows: stack "model", layer -1,
sublayer "head", stream "-" (as the whole-model gradient norms). A model without a head found,
or whose head output is a DTensor sharded over the vocabulary, gets one note and no rows.

Cost: on recorded steps, one logsumexp and two maxima over the (tokens, vocab) logits in the hook
(about the cross-entropy's own work), six small kernels; nothing between them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..discovery import clean_path
from ..hooks import compiler_disable
from ..params import HEAD_NAMES
from .base import Quantity, buffer_dtype, row

METRICS = ("logit_z_mean", "logit_z_max", "logit_max")


def output_head(model: nn.Module, block_modules: set[int]) -> nn.Module | None:
    """The module that makes the output logits: the outermost `get_output_embeddings()` (Hugging
    Face; also inside a wrapper such as DDP or a LightningModule), else the only nn.Linear outside
    the blocks whose name is in HEAD_NAMES; None when there is none or more than one."""
    for m in model.modules():
        get = getattr(m, "get_output_embeddings", None)
        if callable(get):
            try:
                head = get()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, nn.Module):
                return head
    inside = set()
    for m in model.modules():
        if id(m) in block_modules:
            inside.update(id(c) for c in m.modules())
    named = [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and id(m) not in inside
        and clean_path(n, model).rpartition(".")[2] in HEAD_NAMES
    ]
    return named[0] if len(named) == 1 else None


def final_softcap(model: nn.Module) -> float | None:
    """Gemma 2's soft-cap on the final logits (config.final_logit_softcapping), if any."""
    for m in model.modules():
        cap = getattr(getattr(m, "config", None), "final_logit_softcapping", None)
        if cap:
            return float(cap)
    return None


class OutputLogits(Quantity):
    name = "output_logits"
    # A logsumexp over the vocabulary for every token: 2.5 % of a 48-block step on every recorded
    # step (benchmarks/overhead.py), for a drift that builds over thousands of steps (Wortsman et
    # al. 2023: late in training), so on the forward statistics' schedule; `train` records it on
    # every recorded step.
    sparse = True

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self._probe = None
        self._handle = None
        self._cap: float | None = None
        self.buf: torch.Tensor | None = None  # [sum of log Z, tokens]
        self.top: torch.Tensor | None = None  # [largest log Z, largest logit]
        self._fresh = True

    def begin(self, step):
        super().begin(step)
        self._fresh = True

    def attach(self, probe) -> None:
        if self._handle is not None:
            return
        self._probe = probe
        head = output_head(probe.model, {id(b.module) for b in self.setup.blocks})
        if head is None:
            probe._say(
                "output_logits",
                f"probe: output_logits found no output head in {type(probe.model).__name__} (no "
                "get_output_embeddings(), and no single Linear named lm_head, output_projection, ... "
                "outside the blocks): its logit rows are not recorded",
            )
            return
        self._cap = final_softcap(probe.model)
        self._handle = head.register_forward_hook(
            compiler_disable(self._hook)
        )  # eager, as hooks.py

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None

    def _hook(self, module, args, out) -> None:
        if not self.is_active or not self._probe.records_forward(module):
            return
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
            return
        if type(logits).__name__ == "DTensor":
            self._probe._say(
                "output_logits_dtensor",
                "probe: the output head's logits are a DTensor (sharded over the vocabulary): "
                "output_logits is not recorded",
            )
            return
        with torch.no_grad():
            x = logits.detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
            if self._cap is not None:
                x = torch.tanh(x / self._cap) * self._cap
            log_z = torch.logsumexp(x, -1)
            if self.buf is None or (self._fresh and self.buf.device != x.device):
                dtype = buffer_dtype(x.device)
                self.buf = torch.zeros(2, dtype=dtype, device=x.device)
                self.top = torch.full((2,), -math.inf, dtype=dtype, device=x.device)
            elif self._fresh:
                self.buf.zero_()
                self.top.fill_(-math.inf)
            self._fresh = False
            self.buf[0].add_(log_z.sum())
            self.buf[1].add_(log_z.numel())
            peaks = torch.stack([log_z.max(), x.max()]).to(self.top.dtype)
            torch.maximum(self.top, peaks, out=self.top)

    def pooled(self, ctx):
        return None if not self.is_active or self._fresh else self.buf

    def maxima(self, ctx):
        return None if not self.is_active or self._fresh else self.top

    def values(self, ctx, pooled, maxima=None):
        if pooled is None:
            return None
        return torch.cat([pooled[:1] / pooled[1:], pooled[1:], maxima])

    def rows(self, step, host):
        mean, tokens, z_max, logit_max = host
        if tokens <= 0:
            return []
        return [
            row(step, "model", -1, "head", "-", metric, v)
            for metric, v in zip(METRICS, (mean, z_max, logit_max))
        ]
