"""forward_stats: the token-mean statistics of `token_stats.TOKEN_STATS`, plus block_influence.

Taken in each block's forward hook, from the training forwards of a scheduled step (modules in
training mode with grad enabled; eval-mode or no_grad forwards only with include_eval=True;
never inside `probe.paused()` or an activation-checkpoint recomputation), pooled over every
forward of the step (micro-batches) and across data-parallel ranks: each value is a sum over
tokens divided by the number of tokens. block_influence = 1 - cos_adjacent (ShortGPT, Men et
al. 2024), derived at export.

One preallocated (slots, n_stats + 1) buffer per step, [sums..., tokens] per (block, stream):
constant in the number of forwards. Each forward adds one vector per stream: the units' per-token
columns and a column of ones (the token count), stacked and summed over tokens in one reduction.
"""

from __future__ import annotations

import torch

from .base import StreamSlots, row
from .token_stats import TOKEN_STATS, Transition


class ForwardStats(StreamSlots):
    name = "forward_stats"
    uses_forward = True
    stats = TOKEN_STATS
    width = len(TOKEN_STATS) + 1  # [sums..., tokens]

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self._cos = [s.name for s in self.stats].index("cos_adjacent")

    def forward(self, pos, block, ins, outs):
        if ins is None:
            return  # not a residual transition (the block changes the shape)
        buf = self._buffer(outs[0].device)
        with torch.no_grad():
            for si, (prev, cur) in enumerate(zip(ins, outs)):
                t = Transition(prev, cur)
                cols = [s(t) for s in self.stats]
                sums = torch.stack([*cols, torch.ones_like(cols[0])], 1).sum(0)  # [sums..., tokens]
                buf[self._first[pos] + si].add_(sums.to(buf.device, buf.dtype, non_blocking=True))

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
