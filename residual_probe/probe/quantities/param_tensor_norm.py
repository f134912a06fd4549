"""param_tensor_norm: ||dL/dθ||_2 of every parameter tensor, named as `model.named_parameters()`
names it with wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`) stripped.

Off by default (a row per tensor: 771 for a 135M model). It gives what Lightning's
`grad_norm(module, 2)` and W&B's per-tensor watch give, so a user can switch monitors without
losing a column; the total is param_grad_norm's ("model", "total") row. Tied tensors once,
under their first name. One SquaredNorms pass over the gradients, as the other gradient norms.
"""

from __future__ import annotations

import math

from ..discovery import clean_path
from ..gradnorm import SquaredNorms
from ..params import current
from .base import Quantity, row


class ParamTensorNorm(Quantity):
    name = "param_tensor_norm"
    default = False

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        model = setup.params.model
        owners = dict(model.named_modules())
        self.refs, self.names = [], []
        for name, _ in model.named_parameters():
            path, _, attr = name.rpartition(".")
            self.refs.append((owners[path], attr))
            clean = clean_path(path, model)
            self.names.append(f"{clean}.{attr}" if clean else attr)
        self._squares = SquaredNorms()
        self._present: list[bool] = []

    def pooled(self, ctx):
        """Takes the squared norms now, so that sharded ones join the step's one all-reduce."""
        if self.is_active:
            grads = [p.grad for p in current(self.refs)]
            self._present = [g is not None for g in grads]
            self._sq = self._squares(grads, ctx.sums)
        return None

    def values(self, ctx, pooled, maxima=None):
        if not self.is_active:
            return None
        sq, self._sq = self._sq, None
        return ctx.unscale_params(sq.sqrt())

    def rows(self, step, host):
        return [
            row(step, "model", -1, name, "-", self.name, v if ok else math.nan)
            for name, v, ok in zip(self.names, host, self._present)
        ]
