"""param_grad_norm: ||dL/dθ||_2 per block, per sublayer and per parameter group, read at probe.step().

The gradient is whatever `.grad` holds when `probe.step()` is called: accumulated over all
micro-batches, before clipping if step() comes first, AMP-unscaled (the scaler's scale is
divided out unless `scaler.unscale_` already ran). A group none of whose parameters has a
`.grad` (frozen, or step() before any backward) is missing: NaN, counted in `no_grad_count`.
"""

from __future__ import annotations

import math

from .base import Quantity, row


class ParamGradNorm(Quantity):
    name = "param_grad_norm"
    no_grad = 0  # groups without any .grad at the last export
    _missing: tuple = ()

    def values(self, ctx, pooled):
        if not self.is_active:
            return None
        sq, self._missing = ctx.grad_squares()
        norms = self.setup.params.groups.sum_squares(sq).sqrt()
        return ctx.unscale_params(norms)

    def rows(self, step, host):
        blocks = self.setup.blocks
        out = []
        for (pos, sub), v, missing in zip(self.setup.params.keys, host, self._missing):
            b = blocks[pos]
            out.append(row(step, b.stack, b.index, sub, "-", self.name, math.nan if missing else v))
        self.no_grad = sum(self._missing)
        return out
