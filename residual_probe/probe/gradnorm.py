"""Gradient norms of many (overlapping) parameter groups at once, the way clip_grad_norm_ does it.

Tensors are bucketed by (device, dtype, sharding); each bucket takes one `torch._foreach_norm`,
and the per-tensor squared norms are summed into their groups with one `index_add_`, so a
parameter that belongs to a block, a sublayer and a parameter group is normed once.
Nothing calls `.item()`: results stay device tensors, so a training step is not forced to sync.

Sharded gradients (FSDP2's DTensor parameters) are normed on the local shard and the squared
sums are all-reduced over the mesh dimensions that shard them: the result is the global norm
of the full gradient, on every rank (not the shard-local norm that wandb.watch, Lightning's
grad_norm or the HF Trainer log under FSDP). Replicated (DDP) gradients need no reduction.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


def _local(t: torch.Tensor, dtensor) -> tuple[torch.Tensor, tuple]:
    """(local tensor, sharding key): the key names the mesh dims over which squares must be summed."""
    if dtensor is not None and isinstance(t, dtensor):
        if any(p.is_partial() for p in t.placements):  # pending reduction: norm of the sum, not sum of norms
            return t.full_tensor(), ()
        shard_dims = tuple(i for i, p in enumerate(t.placements) if p.is_shard())
        return t.to_local(), ((id(t.device_mesh), shard_dims, t.device_mesh) if shard_dims else ())
    return t, ()


def squared_norms(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Squared L2 norm of each tensor, (len(tensors),); None counts as zero.

    Accumulates in float64 when any input is float64, else float32, on the first tensor's device.
    """
    dtensor = _dtensor_type()
    buckets: dict[tuple, tuple[list[torch.Tensor], list[int], tuple]] = {}
    for i, t in enumerate(tensors):
        if t is None:
            continue
        local, shard = _local(t, dtensor)
        if local.layout != torch.strided or local.is_sparse:
            local = local.to_dense()
        key = (local.device, local.dtype, shard[:2] if shard else ())
        buckets.setdefault(key, ([], [], shard))
        buckets[key][0].append(local)
        buckets[key][1].append(i)
    if not buckets:
        return torch.zeros(len(tensors))
    acc = torch.float64 if any(dt == torch.float64 for _, dt, _ in buckets) else torch.float32
    device = next(iter(buckets))[0]
    out = torch.zeros(len(tensors), dtype=acc, device=device)
    for (dev, _, _), (locals_, index, shard) in buckets.items():
        sq = torch.stack(torch._foreach_norm(locals_)).to(acc).square()
        if shard:
            import torch.distributed as dist

            _, dims, mesh = shard
            for dim in dims:  # sum the shards' squares: the full tensor's squared norm
                dist.all_reduce(sq, group=mesh.get_group(dim))
        out.index_copy_(0, torch.tensor(index, device=device), sq.to(device))
    return out


class GroupNorms:
    """L2 norms of fixed, possibly overlapping groups of tensors, planned once and reused.

    groups: for each group, indices into the tensor list passed at call time.
    """

    def __init__(self, n_tensors: int, groups: Sequence[Sequence[int]]):
        members = [(i, g) for g, group in enumerate(groups) for i in group]
        if any(not 0 <= i < n_tensors for i, _ in members):
            raise ValueError("group index outside the tensor list")
        self.n_tensors, self.n_groups = n_tensors, len(groups)
        self.tensor_index = torch.tensor([i for i, _ in members], dtype=torch.long)
        self.group_index = torch.tensor([g for _, g in members], dtype=torch.long)

    def __call__(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """(n_groups,) norms of the groups, for `tensors` aligned with the planned indices."""
        if len(tensors) != self.n_tensors:
            raise ValueError(f"expected {self.n_tensors} tensors, got {len(tensors)}")
        sq = squared_norms(tensors)
        ti, gi = self.tensor_index.to(sq.device), self.group_index.to(sq.device)
        total = torch.zeros(self.n_groups, dtype=sq.dtype, device=sq.device)
        return total.index_add_(0, gi, sq[ti]).sqrt()


def grouped_norms(groups: Sequence[Sequence[torch.Tensor | None]]) -> torch.Tensor:
    """L2 norm over each group of tensors: a 1-D tensor with one entry per group.

    Missing tensors (None, e.g. a parameter without a gradient) count as zero; a tensor listed
    in several groups is normed once, and listed twice in one group counts once (tied weights).
    """
    unique: dict[int, int] = {}
    tensors: list[torch.Tensor | None] = []
    index: list[list[int]] = []
    for group in groups:
        idx = []
        for t in group:
            if t is None:
                continue
            if id(t) not in unique:
                unique[id(t)] = len(tensors)
                tensors.append(t)
            idx.append(unique[id(t)])
        index.append(list(dict.fromkeys(idx)))  # a tensor twice in one group (tied weights) counts once
    return GroupNorms(len(tensors), index)(tensors)
