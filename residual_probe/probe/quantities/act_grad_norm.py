"""act_grad_norm: RMS over tokens of ||dL/dh_k||, the gradient reaching the residual stream at block k's output.

Taken by a tensor hook on each block's output stream(s), registered from the training forwards
of a scheduled step and fired in their backward: every token of every backward of the step
(all micro-batches), each seeing the loss it was backpropagated from. Across data-parallel
ranks it is pooled as the gradient of the averaged loss (each rank's gradient divided by the
world size, as DDP/FSDP average). Under a GradScaler the scale is divided out at probe.step().
Forwards re-run inside backward (activation checkpointing) register nothing.

Accumulated in one preallocated (rows, 2) buffer per step: [sum of squares, tokens]. A gradient
hook costs two small kernels: it writes ||dL/dh_k|| and the token count into its slot of a
pending (slots, 2) buffer; squaring, weighting and adding into the step's buffer run once for all
slots, when a slot comes round again (the next backward) or at `probe.step()`. (Inside backward
every kernel launch costs several times what it costs warm: eight per hook took ~200 us.)
"""

from __future__ import annotations

from functools import partial

import torch

from .base import StreamSlots, row


def _acc_dtype(grad: torch.Tensor) -> torch.dtype:
    """float32 accumulation for float32 and half gradients, float64 for float64."""
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


class ActGradNorm(StreamSlots):
    name = "act_grad_norm"
    uses_forward = True
    width = 2  # [sum of squares, tokens]

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self._token = object()
        self._pend: torch.Tensor | None = None  # (slots, 2): [norm, tokens] of the current backward
        self._slot_views: list[tuple[torch.Tensor, torch.Tensor]] = []  # views of _pend's slots, made once
        self._filled: set[int] = set()

    def begin(self, step):
        super().begin(step)
        self._token = object()  # tags this step's gradient hooks: a late backward is ignored
        self._filled.clear()

    def detach(self):
        self._token = object()
        self._filled.clear()

    def forward(self, pos, block, ins, outs):
        if not torch.is_grad_enabled():
            return
        for si, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(partial(self._on_grad, self._first[pos] + si, self._token))

    def _on_grad(self, slot: int, token: object, grad: torch.Tensor) -> None:
        if token is not self._token or grad is None:
            return
        dtype = _acc_dtype(grad)
        pend = self._pend
        if pend is None or pend.dtype != dtype or pend.device != grad.device:
            self._reduce()
            pend = self._pend = torch.zeros(len(self.slots), 2, dtype=dtype, device=grad.device)
            self._slot_views = [(r[0], r[1]) for r in pend]
        elif slot in self._filled:
            self._reduce()  # the next backward (micro-batch), or a block run twice
        norm, tokens = self._slot_views[slot]
        torch.linalg.vector_norm(grad.detach(), dtype=dtype, out=norm)
        tokens.fill_(grad.numel() // grad.shape[-1])
        self._filled.add(slot)

    def _reduce(self) -> None:
        """Add the pending backward's squared norms (weighted for the rank average) and counts into the step's buffer."""
        if not self._filled:
            return
        pend = self._pend
        pend[:, 0].square_().mul_(self.setup.grad_average**2)  # gradient of the rank-averaged loss
        buf = self._buffer(pend.device)
        buf.add_(pend.to(buf.device, non_blocking=True))
        pend.zero_()
        self._filled.clear()

    def pooled(self, ctx):
        if self.is_active:
            self._reduce()
        return super().pooled(ctx)

    def state_bytes(self):
        views = sum(t.numel() * t.element_size() for r in self._slot_views for t in r)  # of _pend, counted there
        return super().state_bytes() - views
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
