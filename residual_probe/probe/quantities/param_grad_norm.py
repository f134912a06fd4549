"""param_grad_norm: ||dL/dθ||_2 per block, per sublayer and per parameter group, and of the model's
parts outside the blocks (embedding, final norm, head, other) with the total, read at probe.step().

The whole-model rows have stack "model", layer -1, sublayer the part or "total"; "total" is the
norm over every parameter once (tied weights once), what torch.nn.utils.clip_grad_norm_ returns
for the same gradients. A head tied to the embedding is counted in "embedding" (the probe's
`parts.tied_head` says so).

The gradient is whatever `.grad` holds when `probe.step()` is called: accumulated over all
micro-batches, before clipping if step() comes first, AMP-unscaled (the scaler's scale is
divided out unless `scaler.unscale_` already ran). A group or part none of whose parameters has
a `.grad` (frozen, not reached by the loss, or step() before any backward) is missing: NaN,
counted in `no_grad_count`, not as non-finite.
"""

from __future__ import annotations

import math

import torch

from .base import Quantity, row


class ParamGradNorm(Quantity):
    name = "param_grad_norm"
    no_grad = 0  # rows without any .grad at the last export (groups, parts, total)
    _missing: tuple = ()
    _parts_missing: tuple = ()

    def pooled(self, ctx):
        """Takes the squared norms now, so that sharded ones join the step's one all-reduce."""
        if self.is_active:
            self._sq = ctx.grad_squares()
            self._part_sq = self.setup.params.parts.grad_squares(ctx.sums)
        return None

    def values(self, ctx, pooled, maxima=None):
        if not self.is_active:
            return None
        params = self.setup.params
        (sq, self._missing), (part_sq, self._parts_missing) = self._sq, self._part_sq
        self._sq = self._part_sq = None
        part_sq = params.parts.groups.sum_squares(part_sq.to(sq.device, sq.dtype))
        total = sq.sum() + part_sq.sum()  # every tensor once: blocks' parameters, then the parts'
        norms = torch.cat([params.groups.sum_squares(sq), part_sq, total[None]]).sqrt()
        return ctx.unscale_params(norms)

    def rows(self, step, host):
        blocks, params = self.setup.blocks, self.setup.params
        out = []
        for (pos, sub), v, missing in zip(params.keys, host, self._missing):
            b = blocks[pos]
            out.append(row(step, b.stack, b.index, sub, "-", self.name, math.nan if missing else v))
        missing = (
            *self._parts_missing,
            all(self._missing) and all(self._parts_missing),
        )  # total: no .grad at all
        for part, v, gone in zip([*params.parts.keys, "total"], host[len(params.keys) :], missing):
            out.append(row(step, "model", -1, part, "-", self.name, math.nan if gone else v))
        self.no_grad = sum(self._missing) + sum(missing)
        return out
