"""Gradient norms of many parameter groups at once, the way clip_grad_norm_ does it.

Tensors are grouped by (device, dtype); each group takes one `torch._foreach_norm`, and the
per-tensor norms are summed into their groups with one `index_add_`. Nothing calls `.item()`:
the result stays a device tensor so a training step is not forced to sync with the host.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch


def grouped_norms(groups: Sequence[Sequence[torch.Tensor | None]]) -> torch.Tensor:
    """L2 norm over each group of tensors: returns a 1-D tensor with one entry per group.

    Missing tensors (None, e.g. a parameter without a gradient) count as zero. Norms are
    accumulated in float64 when any input is float64, else float32.
    """
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]] = defaultdict(
        lambda: ([], [])
    )
    for g, tensors in enumerate(groups):
        for t in tensors:
            if t is not None:
                if t.layout != torch.strided or t.is_sparse:
                    t = t.to_dense()
                tensors_, index = buckets[(t.device, t.dtype)]
                tensors_.append(t)
                index.append(g)
    if not buckets:
        return torch.zeros(len(groups))
    acc_dtype = torch.float64 if any(dt == torch.float64 for _, dt in buckets) else torch.float32
    device = next(iter(buckets))[0]
    sq = torch.zeros(len(groups), dtype=acc_dtype, device=device)
    for (dev, _), (tensors, index) in buckets.items():
        norms = torch.stack(torch._foreach_norm(tensors)).to(device=device, dtype=acc_dtype)
        sq.index_add_(0, torch.tensor(index, device=device), norms.square())
    return sq.sqrt()
