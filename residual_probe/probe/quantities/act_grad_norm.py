"""act_grad_norm: RMS over tokens of ||dL/dh_k||, the gradient reaching the residual stream at block k's output.

Taken by a tensor hook on each block's output stream(s), registered from the training forwards
of a scheduled step and fired in their backward: every token of every backward of the step
(all micro-batches), each seeing the loss it was backpropagated from. Across data-parallel
ranks it is pooled as the gradient of the averaged loss (each rank's gradient divided by the
world size, as DDP/FSDP average). Under a GradScaler the scale is divided out at probe.step().
Forwards re-run inside backward (activation checkpointing) register nothing.

Accumulated in one preallocated (rows, 2) buffer per step: [sum of squares, tokens].
"""

from __future__ import annotations

from functools import partial

import torch

from .base import StreamSlots, row


def grad_sq_sum(grad: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ||dL/dh_t||^2 (the squared Frobenius norm), accumulated in float32 or float64."""
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(grad.detach(), dtype=dtype).square()


class ActGradNorm(StreamSlots):
    name = "act_grad_norm"
    uses_forward = True
    width = 2  # [sum of squares, tokens]

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self._token = object()

    def begin(self, step):
        super().begin(step)
        self._token = object()  # tags this step's gradient hooks: a late backward is ignored

    def detach(self):
        self._token = object()

    def forward(self, pos, block, ins, outs):
        if not torch.is_grad_enabled():
            return
        for si, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(partial(self._on_grad, self._first[pos] + si, self._token))

    def _on_grad(self, slot: int, token: object, grad: torch.Tensor) -> None:
        if token is not self._token or grad is None:
            return
        buf = self._buffer(grad.device)
        w = self.setup.grad_average**2  # gradient of the rank-averaged loss
        buf[slot, 0].add_(grad_sq_sum(grad).to(buf.device, non_blocking=True), alpha=w)
        buf[slot, 1].add_(grad.numel() // grad.shape[-1])

    def values(self, ctx, pooled):
        if pooled is None:
            return None
        sums, counts = pooled.view(-1, 2).unbind(1)
        rms = (ctx.unscale_act_sq(sums) / counts).sqrt()
        return torch.cat([rms, counts])

    def rows(self, step, host):
        n = len(self.slots)
        out = []
        for (pos, si), v, c in zip(self.slots, host[:n], host[n:]):
            if c > 0:
                b = self.setup.blocks[pos]
                out.append(row(step, b.stack, b.index, "block", b.streams[si], self.name, v))
        return out
