"""forward_stats: the token-mean statistics of `token_stats.TOKEN_STATS`, plus block_influence.

Taken in each block's forward hook, from the training forwards of a scheduled step (modules in
training mode with grad enabled; eval-mode or no_grad forwards only with include_eval=True;
never inside `probe.paused()` or an activation-checkpoint recomputation), pooled over every
forward of the step (micro-batches) and across data-parallel ranks: each value is a sum over
tokens divided by the number of tokens. block_influence = 1 - cos_adjacent (ShortGPT, Men et
al. 2024), derived at export.

State, constant in the number of forwards: one (slots, n_stats + 1) float64 buffer of
[sums..., tokens] per (block, stream), and a `Pending` (slots, tokens, RAW) buffer of the
current forward's raw columns per stream width, dtype and device (one, in most models). A hook
writes its block's raw row; the per-token arithmetic runs once for all slots when a slot comes
round again (the next forward) or at `probe.step()`, and adds into the sums. Each stream's
output LayerNorm moments are carried to the next block, whose input they are (one (tokens, d)
tensor per stream).
"""

from __future__ import annotations

import torch

from .base import StreamSlots, row
from .token_stats import PADDING, RAW, TOKEN_STATS, Moments, Transition, raw_columns, stats_dtype


class Pending:
    """The raw columns of one forward, (slots, capacity, RAW), for streams of one width, dtype and
    device; rows a forward did not write hold PADDING (token weight 0). Grows to the largest
    token count seen (reallocated once per new maximum)."""

    def __init__(self, slots: int, capacity: int, d: int, dtype: torch.dtype, device: torch.device):
        self.d, self.filled = d, set()
        self._views: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # slot -> (tokens, row, ones)
        self.raw = torch.empty(slots, capacity, len(RAW), dtype=dtype, device=device)
        self.padding = torch.zeros(len(PADDING), dtype=dtype, device=device)  # filled by kernels: no host copy
        for i, v in enumerate(PADDING):
            if v:
                self.padding[i].fill_(v)
        self.ones = torch.ones(capacity, 1, dtype=dtype, device=device)
        self.clear()

    @property
    def capacity(self) -> int:
        return self.raw.shape[1]

    def row(self, slot: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the slot's first `tokens` rows, a (tokens, 1) column of ones): views made once, as
        every view is a dispatched op, and inside a forward each op costs several times its warm cost."""
        v = self._views.get(slot)
        if v is None or v[0] != tokens:
            v = self._views[slot] = (tokens, self.raw[slot, :tokens], self.ones[:tokens])
        return v[1], v[2]

    def clear(self) -> None:
        self.raw.copy_(self.padding.expand_as(self.raw))
        self.filled.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.raw, self.padding, self.ones))  # views: none of their own


class ForwardStats(StreamSlots):
    name = "forward_stats"
    uses_forward = True
    stats = TOKEN_STATS
    width = len(TOKEN_STATS) + 1  # [sums..., tokens]

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self._cos = [s.name for s in self.stats].index("cos_adjacent")
        self._carry: dict[int, Moments] = {}  # stream -> moments of the last block output seen
        self._pending: dict[tuple, Pending] = {}  # (width, dtype, device) -> the current forward's raw columns

    def begin(self, step):
        super().begin(step)
        self._carry.clear()
        for pend in self._pending.values():
            pend.clear()

    def detach(self):
        self._carry.clear()
        self._pending = {}

    def forward(self, pos, block, ins, outs):
        if ins is None:
            return  # not a residual transition (the block changes the shape)
        self._buffer(outs[0].device)  # the step's sums: allocated (or zeroed) with its first forward
        with torch.no_grad():
            for si, (prev, cur) in enumerate(zip(ins, outs)):
                slot, d = self._first[pos] + si, cur.shape[-1]
                tokens = cur.numel() // d
                key = (d, stats_dtype(prev, cur), cur.device)
                pend = self._pending.get(key)
                if pend is None or tokens > pend.capacity:
                    self._reduce(pend)
                    pend = self._pending[key] = Pending(len(self.slots), tokens, *key)
                elif slot in pend.filled:
                    self._reduce(pend)  # a new forward (or a block called twice in one)
                self._carry[si] = raw_columns(prev, cur, *pend.row(slot, tokens), self._carry.get(si))
                pend.filled.add(slot)

    def _reduce(self, pend: Pending | None) -> None:
        """Sum a pending forward's per-token statistics into the step's buffer, for all slots at once."""
        if pend is None or not pend.filled:
            return
        t = Transition(pend.raw, pend.d)
        w = t.weight
        sums = torch.stack([*(s(t) for s in self.stats), w], -1).mul_(w.unsqueeze(-1)).sum(1)  # (slots, width)
        buf = self._buffer(pend.raw.device)
        buf.add_(sums.to(buf.device, non_blocking=True))
        pend.clear()

    def pooled(self, ctx):
        if self.is_active:
            for pend in self._pending.values():
                self._reduce(pend)
        return super().pooled(ctx)

    def state_bytes(self):
        carry = sum(m.nbytes() for m in self._carry.values())
        return super().state_bytes() + carry + sum(p.nbytes() for p in self._pending.values())

    def values(self, ctx, pooled):
        if pooled is None:
            return None
        k = len(self.stats)
        buf = pooled.view(-1, k + 1)
        return torch.cat([(buf[:, :k] / buf[:, k:]).reshape(-1), buf[:, k]])

    def rows(self, step, host):
        k, n = len(self.stats), len(self.slots)
        out = []
        for j, (pos, si) in enumerate(self.slots):
            if host[n * k + j] <= 0:
                continue
            b, stream = self.setup.blocks[pos], self.setup.blocks[pos].streams[si]
            means = host[j * k:(j + 1) * k]
            for s, v in zip(self.stats, means):
                out.append(row(step, b.stack, b.index, "block", stream, s.name, v))
            out.append(row(step, b.stack, b.index, "block", stream, "block_influence", 1.0 - means[self._cos]))
        return out
