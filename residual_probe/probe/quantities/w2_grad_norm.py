"""w2_grad_norm: Frobenius norm of the gradient of each stack's last FFN output weight.

Xiong et al. (2020), Theorem 1: O(d sqrt(ln d)) for Post-LN, independent of depth; O(d sqrt(ln d / L))
for Pre-LN. The weight is chosen by name per family (`params.W2_NAMES`); read at probe.step()
like param_grad_norm (same gradient, same unscaling, NaN when it has no .grad).
"""

from __future__ import annotations

import math

import torch

from .base import Quantity, row


class W2GradNorm(Quantity):
    name = "w2_grad_norm"
    no_grad = 0
    _missing: list = []

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self._index = {}  # device -> index tensor of the W2 weights in the parameter list, made once

    def pooled(self, ctx):
        if self.is_active and self.setup.params.w2:
            ctx.grad_squares()  # taken before the step's all-reduce (sharded squares join it)
        return None

    def values(self, ctx, pooled, maxima=None):
        w2 = self.setup.params.w2
        if not self.is_active or not w2:
            return None
        sq, _ = ctx.grad_squares()
        if sq.device not in self._index:
            self._index[sq.device] = torch.tensor([w.ref for w in w2], device=sq.device)
        self._missing = [g is None for g in self.setup.params.grads([w.ref for w in w2])]
        return ctx.unscale_params(sq.index_select(0, self._index[sq.device]).sqrt())

    def rows(self, step, host):
        out = []
        for w, v, missing in zip(self.setup.params.w2, host, self._missing):
            b = self.setup.blocks[w.pos]
            out.append(
                row(step, b.stack, b.index, w.path, "-", self.name, math.nan if missing else v)
            )
        self.no_grad = sum(self._missing)
        return out
