"""act_grad_norm: RMS over tokens of ||dL/dh_k||, the gradient reaching the residual stream at block k's output.

Taken by a backward pre-hook on the autograd node that made each block output stream,
registered from the training forwards of a scheduled step and fired in their backward: every
token of every backward of the step (all micro-batches), each seeing the loss it was
backpropagated from. Across data-parallel ranks it is pooled as the gradient of the averaged
loss (each rank's gradient divided by the world size, as DDP/FSDP average). Under a GradScaler
the scale is divided out at probe.step(). Forwards re-run inside backward (activation
checkpointing) register nothing.

Tensor parallelism: a block output that is a DTensor (replicated, or sharded on the sequence)
gets its hook on the DTensor's own autograd node, and the gradient's local tensor is normed
(no collective); the coordinator pools the sums and token counts over the mesh, so each rank's
share of the tokens counts once in the ratio. A gradient sharded on the features, or a Partial
sum pending, is not normed (said once).

Cost. A hook launches no kernel: it keeps a reference to the gradient (and its version) and
counts its tokens on the host; the held gradients are normed together with one
`torch._foreach_norm` when they reach HOLD_BYTES, when a slot comes round again (the next
micro-batch) or at `probe.step()`, and their squares added into the step's (slots, 2) buffer
of [sum of squares, tokens] with one strided add per run of consecutive blocks. Inside
backward each kernel a hook launches costs several times its warm cost (a norm and a fill per
hook took ~95 us), and `Tensor.register_hook` costs ~44 us a call against ~3 us for the node's
`register_prehook`. Should anything modify a held gradient in place before it is normed (its
version moved: a custom autograd Function writing into its grad_output), that value is
recorded as NaN, said once, and from then on each gradient is normed in its own hook.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch

from ..gradnorm import _foreach_norm_f32, is_dtensor
from ..stats import whole_tokens
from .base import StreamSlots, row, slot_runs

HOLD_BYTES = 4 << 20
"""Gradient bytes held before they are normed: at most this (plus one gradient) is kept alive
beyond the plain backward; at 256 tokens x 256 dims, 16 blocks a `_foreach_norm`."""


def _acc_dtype(grad: torch.Tensor) -> torch.dtype:
    """float32 accumulation for float32 and half gradients, float64 for float64."""
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


class ActGradNorm(StreamSlots):
    name = "act_grad_norm"
    uses_forward = True
    wants_dtensor = (
        True  # the hook goes on a DTensor output's own node; its gradient is read locally
    )
    width = 2  # [sum of squares, tokens]

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self._token = object()
        self._held: list[
            tuple[int, torch.Tensor, int]
        ] = []  # (slot, gradient, its version when seen)
        self._held_slots: set[int] = set()
        self._held_bytes = 0
        self._counts = [0] * len(
            self.slots
        )  # tokens per slot this step: host integers, no kernel per hook
        self._hold = True  # False once a held gradient was seen modified: norm each in its hook

    def begin(self, step):
        super().begin(step)
        self._token = object()  # tags this step's gradient hooks: a late backward is ignored
        self._drop()

    def detach(self):
        self._token = object()
        self._drop()

    def _drop(self):
        self._held, self._held_bytes = [], 0
        self._held_slots.clear()
        self._counts = [0] * len(self.slots)

    def forward(self, pos, block, ins, outs):
        if not torch.is_grad_enabled():
            return
        if block.stacked:  # n copies in one tensor: its gradient is split on dim -2 in the hook
            base = outs[0]._base
            if base is not None and base.requires_grad and base.grad_fn is not None:
                slot = self._first[pos]
                hook = partial(self._on_stacked, slot, self._token, base.output_nr)
                base.grad_fn.register_prehook(hook)
            return
        for si, t in enumerate(outs):
            if t.requires_grad:
                slot = self._first[pos] + si
                node = t.grad_fn
                if node is not None:  # ~3 us, against ~44 us for Tensor.register_hook
                    node.register_prehook(partial(self._on_grads, slot, self._token, t.output_nr))
                else:  # a leaf passed through: its gradient is accumulated, not flowed
                    t.register_hook(partial(self._on_grad, slot, self._token))

    def _on_grads(self, slot: int, token: object, nr: int, grad_outputs: tuple) -> None:
        self._on_grad(slot, token, grad_outputs[nr])

    def _on_stacked(self, first: int, token: object, nr: int, grad_outputs: tuple) -> None:
        grad = grad_outputs[nr]
        if grad is not None:
            for i, g in enumerate(grad.unbind(-2)):
                self._on_grad(first + i, token, g)

    def _on_grad(self, slot: int, token: object, grad: torch.Tensor | None) -> None:
        if token is not self._token or grad is None:
            return
        if is_dtensor(grad):  # tensor parallelism: this rank's tokens of the gradient
            if not whole_tokens(grad):
                warnings.warn(
                    "probe: a block output's gradient is a DTensor sharded on its features (or a pending "
                    "Partial sum): act_grad_norm skips it",
                    stacklevel=3,
                )
                return
            grad = grad.to_local()
        if slot in self._held_slots:
            self._flush()  # the next backward (micro-batch), or a block run twice
        self._held.append((slot, grad, grad._version))
        self._held_slots.add(slot)
        self._counts[slot] += grad.numel() // grad.shape[-1]
        self._held_bytes += grad.numel() * grad.element_size()
        if self._held_bytes >= HOLD_BYTES or not self._hold:
            self._flush()

    def _flush(self) -> None:
        """Norm the held gradients and add their squares (weighted for the rank average) into the step's buffer."""
        held = self._held
        if not held:
            return
        self._held, self._held_bytes = [], 0
        self._held_slots.clear()
        groups: dict[tuple, list[tuple[int, torch.Tensor, int]]] = {}
        for h in held:
            groups.setdefault((h[1].device, _acc_dtype(h[1])), []).append(h)
        with torch.no_grad():
            for (device, acc), part in groups.items():
                norms = _foreach_norm_f32([g for _, g, _ in part], acc)
                buf = self._buffer(device)
                sq = torch.stack(norms).to(buf.dtype).square_()
                if self.setup.grad_average != 1.0:
                    sq.mul_(self.setup.grad_average**2)  # gradient of the rank-averaged loss
                changed = [i for i, (_, g, v) in enumerate(part) if g._version != v]
                if changed:
                    self._modified(changed, sq, part)
                col = buf[:, 0]
                slots = [s for s, _, _ in part]
                for i, j, rows, flip in slot_runs(slots):
                    col[rows].add_(sq[i:j].flip(0) if flip else sq[i:j])

    def _modified(self, changed: list[int], sq: torch.Tensor, part) -> None:
        """A held gradient changed before it was normed: its value is unknown (NaN); hold no more."""
        for i in changed:
            sq[i] = float("nan")
        self._hold = False
        b = self.setup.blocks[self.slots[part[changed[0]][0]][0]]
        warnings.warn(
            f"probe: the gradient at {b.name}'s output was modified in place during backward (a custom "
            "autograd Function?): act_grad_norm of this step is NaN there; from now on it is taken in "
            "each hook",
            stacklevel=3,
        )

    def pooled(self, ctx):
        if self.is_active:
            self._flush()
            if self.buf is not None and not self._fresh:
                counts = torch.tensor(self._counts, dtype=self.buf.dtype)
                if self.buf.device.type == "cuda":
                    counts = counts.pin_memory()
                self.buf[:, 1].copy_(counts, non_blocking=True)  # host to device: no sync
        return super().pooled(ctx)

    def values(self, ctx, pooled, maxima=None):
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
