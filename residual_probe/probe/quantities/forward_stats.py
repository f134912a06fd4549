"""forward_stats: the token-mean statistics of `token_stats.TOKEN_STATS`, plus block_influence.

Taken in each block's forward hook, from the training forwards of a scheduled step (modules in
training mode with grad enabled; eval-mode or no_grad forwards only with include_eval=True;
never inside `probe.paused()` or an activation-checkpoint recomputation), pooled over every
forward of the step (micro-batches) and across data-parallel ranks: each value is a sum over
tokens divided by the number of tokens. block_influence = 1 - cos_adjacent (ShortGPT, Men et
al. 2024), derived at export. norm_sq_per_dim_max: the largest token's ||h_k||^2/d over the same
tokens (the peak `collapse` reports beside the median; massive activations, Sun et al. 2024),
maximized over forwards and ranks.

State, constant in the number of forwards: one (slots, n_stats + 1) float64 buffer of
[sums..., tokens] per (block, stream), and a `Pending` (slots, tokens, RAW) buffer of the current
forward's raw columns per stream width, dtype and device (one, in most models). How a block's
raw rows are made depends on the size of its states (token_stats explains why):
- small (at most CHAIN_BYTES / MIN_CHAIN): per stream a `Chain`, a buffer of about CHAIN_BYTES
  into which the hook copies the block's output while it is hot (one kernel). While each block's
  input is the previous block's output, unmodified (identity and version checked), the states
  queue up; when the chain is full, breaks, or at the end of the forward, `chain_columns` turns
  them into raw rows for all their blocks at once. Copies, not references: an edit of a block's
  output after its hook cannot change what was recorded.
- large: `raw_columns` in the hook, on the tensors where they are, with the previous output's
  LayerNorm carried to the next block (`Moments`, one (tokens, d) tensor per stream; reused only
  when the input is that very tensor, unmodified).
The per-token arithmetic runs once for all slots when a slot comes round again (the next
forward) or at `probe.step()`, and adds into the sums.
"""

from __future__ import annotations

import math
import weakref

import torch

from .base import StreamSlots, row, slot_runs
from .token_stats import (
    PADDING,
    RAW,
    TOKEN_STATS,
    Moments,
    Transition,
    chain_columns,
    raw_columns,
    stats_dtype,
)

CHAIN_BYTES = 4 << 20
"""A chain's buffer size. States of at most CHAIN_BYTES / MIN_CHAIN bytes are chained (at 256
tokens x 256 dims, 16 states: 15 blocks a batch); larger ones (2048 x 1024 dims: 8 MiB), where a
block's own work dwarfs a kernel launch, are reduced in place, one block at a time."""
MIN_CHAIN = 4


class Pending:
    """The raw columns of one forward, (slots, capacity, RAW), for streams of one width, dtype and
    device; rows a forward did not write hold PADDING (token weight 0). Grows to the largest
    token count seen (reallocated once per new maximum)."""

    def __init__(self, slots: int, capacity: int, d: int, dtype: torch.dtype, device: torch.device):
        self.d, self.filled = d, set()
        self._views: dict[
            int, tuple[int, torch.Tensor, torch.Tensor]
        ] = {}  # slot -> (tokens, row, ones)
        self.raw = torch.empty(slots, capacity, len(RAW), dtype=dtype, device=device)
        self.padding = torch.zeros(
            len(PADDING), dtype=dtype, device=device
        )  # filled by kernels: no host copy
        for i, v in enumerate(PADDING):
            if v:
                self.padding[i].fill_(v)
        self.ones = torch.ones(capacity, 1, dtype=dtype, device=device)
        self.clear()

    @property
    def capacity(self) -> int:
        return self.raw.shape[1]

    def row(self, slot: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the slot's first `tokens` rows, a (tokens, 1) column of ones) for `raw_columns`: views
        made once, as every view is a dispatched op, and inside a forward each op costs several times its warm cost."""
        v = self._views.get(slot)
        if v is None or v[0] != tokens:
            v = self._views[slot] = (tokens, self.raw[slot, :tokens], self.ones[:tokens])
        return v[1], v[2]

    def write(self, slots: list[int], raw: torch.Tensor) -> None:
        """raw (len(slots), tokens, RAW) into the given slots' first `tokens` rows: one copy per run
        of evenly spaced slots (a chain of consecutive blocks is one run)."""
        tokens = raw.shape[1]
        for i, j, rows, flip in slot_runs(slots):
            self.raw[rows, :tokens].copy_(raw[i:j].flip(0) if flip else raw[i:j])

    def clear(self) -> None:
        self.raw.copy_(self.padding.expand_as(self.raw))
        self.filled.clear()

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.raw, self.padding, self.ones)
        )  # views: none of their own


class Chain:
    """Consecutive residual states of one stream, each the next block's input, copied into one
    buffer as the hooks see them; `flush` writes the raw columns of their transitions to the
    pending slots. Keeps the last state, so the chain goes on across flushes."""

    def __init__(self, dtype: torch.dtype, device: torch.device, longest: int):
        self.longest = longest  # states of the longest chain a forward can make (blocks + 1)
        self.store = torch.empty(0, dtype=dtype, device=device)
        self.states: torch.Tensor | None = None  # (rows, tokens, d), a view of store
        self.rows: tuple[torch.Tensor, ...] = ()  # its rows, each in the shape of the block outputs
        self.n = 0  # states queued
        self.slots: list[int] = []  # the pending slot of each queued transition
        self.last: weakref.ref | None = None  # the tensor the last state was copied from
        self.version = -1

    def continues(self, prev: torch.Tensor) -> bool:
        """Whether `prev` is the last state queued, unmodified since."""
        return (
            self.n > 0
            and self.last is not None
            and self.last() is prev
            and prev._version == self.version
        )

    def start(self, prev: torch.Tensor) -> None:
        """Begin a new chain at `prev` (after `flush`)."""
        d = prev.shape[-1]
        per = prev.numel()
        rows = max(2, min(self.longest, CHAIN_BYTES // (per * self.store.element_size())))
        if self.store.numel() < rows * per:
            self.store = torch.empty(rows * per, dtype=self.store.dtype, device=self.store.device)
        self.states = self.store[: rows * per].view(rows, per // d, d)
        self.rows = (
            self.store[: rows * per].view(rows, *prev.shape).unbind(0)
        )  # one view per row, in the input's shape
        self.n = 0
        self._push(prev)

    def push(self, cur: torch.Tensor, slot: int) -> bool:
        """Queue block output `cur` as the transition of `slot`; True when the buffer is full."""
        self._push(cur)
        self.slots.append(slot)
        return self.n == len(self.rows)

    def _push(self, t: torch.Tensor) -> None:
        self.rows[self.n].copy_(t)  # one kernel: the caller runs under no_grad
        self.n += 1
        self.last, self.version = weakref.ref(t), t._version

    def flush(self, pend: Pending) -> None:
        if self.slots:
            pend.write(self.slots, chain_columns(self.states[: self.n]))
            self.rows[0].copy_(self.rows[self.n - 1])
            self.n, self.slots = 1, []

    def nbytes(self) -> int:
        return self.store.numel() * self.store.element_size()


class ForwardStats(StreamSlots):
    name = "forward_stats"
    uses_forward = True
    sparse = True
    stats = TOKEN_STATS
    width = len(TOKEN_STATS) + 1  # [sums..., tokens]
    peaks = 1  # the largest token's ||h||^2/d

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self._cos = [s.name for s in self.stats].index("cos_adjacent")
        self._pending: dict[
            tuple, Pending
        ] = {}  # (width, dtype, device) -> the current forward's raw columns
        self._chains: dict[
            tuple, Chain
        ] = {}  # (stream, width, dtype, device) -> its chain (small states)
        self._carry: dict[
            int, Moments
        ] = {}  # stream -> moments of the last large block output seen

    def begin(self, step):
        super().begin(step)
        self._carry.clear()
        for chain in self._chains.values():
            chain.n, chain.slots = 0, []
        for pend in self._pending.values():
            pend.clear()

    def detach(self):
        self._pending, self._chains = {}, {}
        self._carry.clear()

    def forward(self, pos, block, ins, outs):
        if ins is None:
            return  # not a residual transition (the block changes the shape)
        self._buffer(
            outs[0].device
        )  # the step's sums: allocated (or zeroed) with its first forward
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
                if MIN_CHAIN * tokens * d * pend.raw.element_size() <= CHAIN_BYTES:
                    self._chain(si, key, pend, prev, cur, slot)
                else:
                    self._carry[si] = raw_columns(
                        prev, cur, *pend.row(slot, tokens), self._carry.get(si)
                    )
                pend.filled.add(slot)

    def _chain(self, si, key, pend, prev, cur, slot) -> None:
        chain = self._chains.get((si, *key))
        if chain is None:
            chain = self._chains[(si, *key)] = Chain(*key[1:], len(self.setup.blocks) + 1)
        if not chain.continues(prev):
            chain.flush(pend)
            chain.start(prev)
        if chain.push(cur, slot):
            chain.flush(pend)

    def _reduce(self, pend: Pending | None) -> None:
        """Sum a pending forward's per-token statistics into the step's buffer, for all slots at once."""
        if pend is None or not pend.filled:
            return
        for (_si, *key), chain in self._chains.items():
            if self._pending.get(tuple(key)) is pend:
                chain.flush(pend)
        t = Transition(pend.raw, pend.d)
        w = t.weight
        sums = (
            torch.stack([*(s(t) for s in self.stats), w], -1).mul_(w.unsqueeze(-1)).sum(1)
        )  # (slots, width)
        peak = torch.where(w > 0, t.norm_sq[..., 1], -math.inf).amax(1, keepdim=True) / t.d
        buf = self._buffer(pend.raw.device)
        buf.add_(sums.to(buf.device, non_blocking=True))
        torch.maximum(self.top, peak.to(buf.device, buf.dtype, non_blocking=True), out=self.top)
        pend.clear()

    def pooled(self, ctx):
        if self.is_active:
            for pend in self._pending.values():
                self._reduce(pend)
        return super().pooled(ctx)

    def state_bytes(self):
        chains = sum(c.nbytes() for c in self._chains.values()) + sum(
            m.nbytes() for m in self._carry.values()
        )
        return super().state_bytes() + chains + sum(p.nbytes() for p in self._pending.values())

    def values(self, ctx, pooled, maxima=None):
        if pooled is None:
            return None
        k = len(self.stats)
        buf = pooled.view(-1, k + 1)
        return torch.cat([(buf[:, :k] / buf[:, k:]).reshape(-1), buf[:, k], maxima])

    def rows(self, step, host):
        k, n = len(self.stats), len(self.slots)
        out = []
        for j, (pos, si) in enumerate(self.slots):
            if host[n * k + j] <= 0:
                continue
            b, stream = self.setup.blocks[pos], self.setup.blocks[pos].streams[si]
            means = host[j * k : (j + 1) * k]
            for s, v in zip(self.stats, means):
                out.append(row(step, b.stack, b.index, "block", stream, s.name, v))
            peak = host[n * (k + 1) + j]
            out.append(row(step, b.stack, b.index, "block", stream, "norm_sq_per_dim_max", peak))
            out.append(
                row(
                    step,
                    b.stack,
                    b.index,
                    "block",
                    stream,
                    "block_influence",
                    1.0 - means[self._cos],
                )
            )
        return out
