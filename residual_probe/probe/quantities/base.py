"""The shared base of the probe's quantities (Cockpit's `quantities/` as the model).

A quantity is one small class: its schedule (`rule`, a step -> bool callable), the hooks it
needs (`uses_forward` for the blocks' forward hook, `attach`/`detach` for anything else, such as
optimizer hooks), its device-side reduction (`forward`, and gradient hooks it registers itself),
and its export (`pooled` -> `values` -> `rows`). The `Probe` only coordinates: it owns the
hooks, the step counter, the one device-to-host copy per step and the sinks, and treats every
quantity alike.

Per recorded step the coordinator calls, for every quantity:
1. `begin(step)` when a step opens (`active` tells whether this quantity is scheduled on it);
2. `forward(pos, block, ins, outs)` from each training forward of block `pos`, when scheduled;
3. at `probe.step()`: `pooled(ctx)`, a 1-D device tensor of sums to add across data-parallel
   ranks (or None), and `maxima(ctx)`, a 1-D device tensor of largest values to take the largest
   of across ranks (or None); then `values(ctx, pooled, maxima)` with both reduced, the 1-D
   device tensor to export (or None); gradient quantities take their squared norms in `pooled`
   (`ctx.grad_squares()`), so that sharded ones join the same one collective
   (`distributed.reduce_step`); all quantities' values are concatenated and copied to the host
   once;
4. `rows(step, host)` with the host floats of its own values.
Nothing here calls `.item()`, `.tolist()` on a device tensor or copies index tensors to a
device inside a hook.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch

from ..records import row

Rule = Callable[[int], bool]


class Quantity:
    """One measured quantity; see the module doc for the life cycle."""

    name: ClassVar[str] = ""
    uses_forward: ClassVar[bool] = False  # needs the blocks' forward hook on its scheduled steps
    default: ClassVar[bool] = True  # recorded by a Probe built without `quantities=`
    wants_dtensor: ClassVar[bool] = (
        False  # `forward` gets DTensor block outputs as they are, not their local tensors
    )
    sparse: ClassVar[bool] = (
        False  # on a sparser schedule in the integrations and `train` (schedule.FORWARD_EVERY)
    )

    def __init__(self, setup: Any, rule: Rule):
        self.setup = setup  # the probe's shared, read-only facts: blocks, parameter plan, options
        self.rule = rule
        self.is_active = False

    def active(self, step: int) -> bool:
        return bool(self.rule(step))

    def begin(self, step: int) -> None:
        """A step opens; reset per-step state (the buffers are reused, not reallocated)."""
        self.is_active = self.active(step)

    def forward(self, pos: int, block, ins: tuple | None, outs: tuple) -> None:
        """One training forward of block `pos`: `outs` its output streams, `ins` its input streams
        (None where they differ in shape from the output, i.e. not a residual transition)."""

    def pooled(self, ctx) -> torch.Tensor | None:
        """Sums over this rank's tokens that the coordinator adds across data-parallel ranks."""
        return None

    def maxima(self, ctx) -> torch.Tensor | None:
        """Largest values over this rank's tokens, of which the coordinator takes the largest
        across data-parallel ranks (in the step's one collective, with the sums)."""
        return None

    def values(
        self, ctx, pooled: torch.Tensor | None, maxima: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The 1-D device tensor of this step's numbers (None: nothing to export), from the
        reduced `pooled` sums and `maxima`."""
        return None

    def rows(self, step: int, host: list[float]) -> list[dict]:
        """Rows from the host copy of `values`."""
        return []

    def attach(self, probe) -> None:
        """Extra hooks beyond the blocks' forward hook (e.g. on the optimizer)."""

    def detach(self) -> None:
        """Remove what `attach` added and drop pending state."""

    def state_bytes(self) -> int:
        """Bytes held in tensors by this quantity between steps (for the boundedness checks)."""
        return _tensor_bytes(vars(self))


class StreamSlots(Quantity):
    """A quantity that sums into one preallocated (slots, width) buffer per step, a slot per
    (block, stream): allocated on the first device it sees, zeroed lazily when a step's first
    value arrives, constant in the number of forwards; its rows are what `pooled` returns. With
    `peaks` > 0, a (slots, peaks) buffer `top` beside it holds largest values (-inf when fresh),
    which `maxima` returns."""

    width: ClassVar[int] = 1
    peaks: ClassVar[int] = 0

    def __init__(self, setup: Any, rule: Rule):
        super().__init__(setup, rule)
        self.slots = [
            (pos, si) for pos, b in enumerate(setup.blocks) for si in range(len(b.streams))
        ]
        self._first: dict[int, int] = {}  # block position -> its first slot
        for j, (pos, _) in enumerate(self.slots):
            self._first.setdefault(pos, j)
        self.buf: torch.Tensor | None = None
        self.top: torch.Tensor | None = None
        self._fresh = True

    def begin(self, step: int) -> None:
        super().begin(step)
        self._fresh = True

    def _buffer(self, device: torch.device) -> torch.Tensor:
        """This step's buffer; on the device of the step's first value (a model split over devices
        adds its other blocks' values with a non-blocking copy)."""
        if self.buf is None or (self._fresh and self.buf.device != device):
            dtype = buffer_dtype(device)
            self.buf = torch.zeros(len(self.slots), self.width, dtype=dtype, device=device)
            self.top = torch.empty(len(self.slots), self.peaks, dtype=dtype, device=device)
            self.top.fill_(-math.inf)
        elif self._fresh:
            self.buf.zero_()
            self.top.fill_(-math.inf)
        self._fresh = False
        return self.buf

    def pooled(self, ctx) -> torch.Tensor | None:
        if not self.is_active or self.buf is None or self._fresh:
            return None
        return self.buf.reshape(-1)

    def maxima(self, ctx) -> torch.Tensor | None:
        if not self.peaks or self.pooled(ctx) is None:
            return None
        return self.top.reshape(-1)


def slot_runs(slots: list[int]) -> list[tuple[int, int, slice, bool]]:
    """Split `slots` into runs of evenly spaced slots: (i, j, target, flip) means values[i:j]
    go to rows[target], reversed when flip. A stack's blocks come in order (forward) or in
    reverse (backward), so a run is usually the whole list: one kernel, not one per slot."""
    runs, i = [], 0
    while i < len(slots):
        j = i + 1
        step = slots[j] - slots[i] if j < len(slots) else 1
        while step != 0 and j < len(slots) and slots[j] - slots[j - 1] == step:
            j += 1
        if j == i + 1:
            step = 1
        lo, hi = min(slots[i], slots[j - 1]), max(slots[i], slots[j - 1])
        runs.append((i, j, slice(lo, hi + 1, abs(step)), step < 0))
        i = j
    return runs


def _tensor_bytes(obj, depth: int = 0) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if depth > 3:
        return 0
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, depth + 1) for v in obj)
    return 0


def buffer_dtype(device: torch.device) -> torch.dtype:
    """float64 accumulators, except on MPS (no float64 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


__all__ = ["Quantity", "Rule", "StreamSlots", "buffer_dtype", "row", "slot_runs"]
