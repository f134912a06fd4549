"""What the hooks reduce, and where the reductions wait until the step is exported.

The per-layer formulas live once, in `residual_probe.analysis.metrics`; this module applies them
to a block's input and output streams and keeps token-weighted sums as device tensors, so the
hooks never call `.item()` and memory does not grow with depth x tokens x d.
"""

from __future__ import annotations

import torch

from ..analysis import metrics

FORWARD_METRICS = ("cos_adjacent", "relative_update", "norm_sq_per_dim", "ln_update")  # token means
ACT = "act_grad_norm"
SLOT_METRICS = FORWARD_METRICS + (ACT,)


def stream_tensors(value, n_streams: int) -> tuple[torch.Tensor, ...] | None:
    """The residual stream tensors in a block's input or output, or None if there are none.

    A tensor is one stream; a tuple is ResiDual's (x, d) when the block has two streams, else
    a Hugging Face output whose first element is the hidden state.
    """
    if isinstance(value, torch.Tensor):
        return (value,) if n_streams == 1 else None
    if isinstance(value, (tuple, list)) and len(value) >= n_streams:
        head = tuple(value[:n_streams])
        if all(isinstance(t, torch.Tensor) for t in head):
            return head
    return None


def block_forward_stats(prev: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """FORWARD_METRICS of one stream across one block, each a 0-d tensor (mean over tokens)."""
    return metrics.transition_stats(prev, cur)  # the four in one pass, same order as FORWARD_METRICS


def grad_sq_sum(grad: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ||dL/dh_t||^2 (the squared Frobenius norm), in float32 or float64."""
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(grad.detach(), dtype=dtype).square()


class Accumulator:
    """Weighted sums and counts per slot (block, stream, metric), kept as device tensors.

    `add` appends; `reduce` does one stack + index_add (and one all_reduce across data-parallel
    ranks), so a step with many micro-batches pools them: token means stay token means.
    """

    def __init__(self, streams_per_block: list[int]):
        self.offsets, total = [], 0
        for n in streams_per_block:
            self.offsets.append(total)
            total += n * len(SLOT_METRICS)
        self.size = total
        self.reset()

    def slot(self, block: int, stream: int, metric: str) -> int:
        return self.offsets[block] + stream * len(SLOT_METRICS) + SLOT_METRICS.index(metric)

    def reset(self) -> None:
        self.values: list[torch.Tensor] = []
        self.slots: list[int] = []
        self.weights: list[float] = []
        self.counts = [0] * self.size

    def add(self, slot: int, value: torch.Tensor, weight: float, count: int) -> None:
        self.values.append(value)
        self.slots.append(slot)
        self.weights.append(weight)
        self.counts[slot] += count

    def reduce(self, device: torch.device, group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums / counts, counts) per slot, float64 (float32 on MPS); NaN where count is 0."""
        dtype = torch.float32 if device.type == "mps" else torch.float64
        sums = torch.zeros(self.size, dtype=dtype, device=device)
        if self.values:
            kinds = {(v.dtype, v.device) for v in self.values}
            vals = (torch.stack(self.values) if len(kinds) == 1  # the common case: one stack, one cast
                    else torch.stack([v.to(device=device, dtype=dtype) for v in self.values]))
            vals = vals.to(device=device, dtype=dtype)
            w = torch.tensor(self.weights, dtype=dtype, device=device)
            sums.index_add_(0, torch.tensor(self.slots, device=device), vals * w)
        counts = torch.tensor(self.counts, dtype=dtype, device=device)
        if group is not None:
            import torch.distributed as dist

            buf = torch.cat([sums, counts])
            dist.all_reduce(buf, group=group)
            sums, counts = buf[: self.size], buf[self.size :]
        return sums / counts, counts
