"""Norms of many (overlapping) parameter groups at once, the way clip_grad_norm_ does it.

Tensors are bucketed by (device, dtype, sharding); each bucket takes one `torch._foreach_norm`,
and the per-tensor squared norms are summed into their groups with one `index_add_`, so a
parameter that belongs to a block, a sublayer and a parameter group is normed once.
Nothing calls `.item()`: results stay device tensors, so a training step is not forced to sync.
The bucketing and the device index tensors are planned once and reused for as long as the
tensors keep their layout (which are present, their dtypes and devices): a training loop pays
for planning on its first recorded step only (`plans_built` counts them).

Sharded gradients (FSDP2's DTensor parameters) are normed on the local shard and the squared
sums are all-reduced over the mesh dimensions that shard them: the result is the global norm
of the full gradient, on every rank (not the shard-local norm that wandb.watch, Lightning's
grad_norm or the HF Trainer log under FSDP). Replicated (DDP) gradients need no reduction. On a
2-D mesh (FSDP2 + tensor parallel) a parameter is sharded on both dimensions (FSDP's
`_StridedShard` over the tensor-parallel `Shard`): its squares are summed over both.

Inside a probe step the sum over shards joins the step's one all-reduce (`RankSums`): each
rank's squared sums are divided by the number of ranks holding the same shard, so that one sum
over the probe's process group counts every shard once, whatever the mesh's shape.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch

_DTENSOR: list = []  # DTensor's class, once its module has been seen


def dtensor_type():
    """DTensor's class if its module has been imported, else None: a DTensor cannot exist before
    that, and importing torch.distributed.tensor ourselves costs ~1 s (sympy and the op tables)."""
    if not _DTENSOR:
        for name in (
            "torch.distributed.tensor",
            "torch.distributed._tensor",
        ):  # torch >= 2.4, torch 2.3
            cls = getattr(sys.modules.get(name), "DTensor", None)
            if cls is not None:
                _DTENSOR.append(cls)
                break
    return _DTENSOR[0] if _DTENSOR else None


def is_dtensor(t) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def _foreach_norm_f32(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """torch._foreach_norm accumulating in `dtype` (float32 for half/bfloat16 inputs, float64 stays)."""
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=dtype))
    except TypeError:  # older torch without the dtype argument
        return list(torch._foreach_norm([t.to(dtype) for t in tensors]))


def _local(t: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """(local tensor, sharding key): the key names the mesh dims over which squares must be summed."""
    if is_dtensor(t):
        if any(
            p.is_partial() for p in t.placements
        ):  # pending reduction: norm of the sum, not sum of norms
            return t.full_tensor(), ()
        # every placement that is neither Replicate nor Partial splits the tensor: Shard, and the
        # _StridedShard FSDP2 puts on top of tensor parallelism (whose is_shard() says False)
        shard_dims = tuple(i for i, p in enumerate(t.placements) if not p.is_replicate())
        return t.to_local(), ((id(t.device_mesh), shard_dims, t.device_mesh) if shard_dims else ())
    return t, ()


class RankSums:
    """Vectors to be summed over a process group of `world` ranks at the probe step's one
    all-reduce, which writes the sums back into them in place."""

    def __init__(self, world: int):
        self.world = world
        self.vectors: list[torch.Tensor] = []


class SquaredNorms:
    """Squared L2 norm of each tensor of a list, with the bucketing planned once per layout.

    Call with a list of tensors (None counts as zero); returns (len,) on the first bucket's
    device, float64 when any input is float64, else float32. `plans_built` counts re-plans.
    """

    def __init__(self):
        self._key = None
        self._plan = None
        self._dense: list[int] = []  # indices of tensors that are not strided (sparse gradients)
        self.plans_built = 0

    @staticmethod
    def _layout(tensors: list, shards: list | None) -> tuple:
        """What the plan depends on: which tensors are present, their dtypes, devices, layouts and
        sharding. Flat lists, not a tuple per tensor: at 12k parameters those tuples alone trigger
        dozens of garbage-collector passes a step."""
        return (
            [None if t is None else t.dtype for t in tensors],
            [None if t is None else t.device for t in tensors],
            [None if t is None else t.layout for t in tensors],
            None if shards is None else [s[:2] if s else () for s in shards],
        )

    def _build(self, tensors: list, shards: list | None, key: tuple) -> None:
        buckets: dict[tuple, tuple[list[int], tuple]] = {}
        for i, (dtype, device) in enumerate(zip(key[0], key[1])):
            if dtype is not None:
                shard = shards[i] if shards is not None else ()
                buckets.setdefault(
                    (device, dtype, key[3][i] if shards is not None else ()), ([], shard)
                )[0].append(i)
        self._dense = [
            i for i, layout in enumerate(key[2]) if layout is not None and layout != torch.strided
        ]
        if not buckets:
            self._plan = None
        else:
            acc = torch.float64 if any(k[1] == torch.float64 for k in buckets) else torch.float32
            device = next(iter(buckets))[0]
            order = [i for idx, _ in buckets.values() for i in idx]
            self._plan = (
                acc,
                device,
                [(k, idx, shard) for k, (idx, shard) in buckets.items()],
                torch.tensor(order, dtype=torch.long, device=device),
            )
        self._key = key
        self.plans_built += 1

    def __call__(
        self, tensors: Sequence[torch.Tensor | None], sums: RankSums | None = None
    ) -> torch.Tensor:
        """sums: with sharded tensors, leave the sum over shards to the caller's one all-reduce
        (the result is complete once it ran); None: all-reduce here, per mesh dimension."""
        cls = dtensor_type()
        if cls is None or not any(
            isinstance(t, cls) for t in tensors
        ):  # plain tensors, nothing sharded
            shards = None
        else:
            pairs = [(None, ()) if t is None else _local(t) for t in tensors]
            tensors, shards = [t for t, _ in pairs], [s for _, s in pairs]
        key = self._layout(tensors, shards)
        if key != self._key:
            self._build(tensors, shards, key)
        if self._plan is None:
            return torch.zeros(len(tensors))
        if self._dense:  # sparse gradients (nn.Embedding(sparse=True)) are normed densely
            tensors = list(tensors)
            for i in self._dense:
                tensors[i] = tensors[i].to_dense()
        acc, device, buckets, order = self._plan
        defer = sums is not None and any(shard for _, _, shard in buckets)
        parts = []
        for _, idx, shard in buckets:
            sq = torch.stack(_foreach_norm_f32([tensors[i] for i in idx], acc)).to(acc).square()
            if defer:  # every rank adds its share: world / (number of distinct shards) ranks hold each shard
                _, dims, mesh = shard or (None, (), None)
                shards = 1
                for dim in dims:
                    shards *= mesh.size(dim)
                sq = sq * (shards / sums.world)
            elif shard:
                import torch.distributed as dist

                _, dims, mesh = shard
                for dim in dims:  # sum the shards' squares: the full tensor's squared norm
                    dist.all_reduce(sq, group=mesh.get_group(dim))
            parts.append(sq.to(device, non_blocking=True))
        out = torch.zeros(len(tensors), dtype=acc, device=device)
        out.index_copy_(0, order, torch.cat(parts))
        if defer:
            sums.vectors.append(out)
        return out


def squared_norms(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Squared L2 norm of each tensor, (len(tensors),); None counts as zero (planned afresh)."""
    return SquaredNorms()(tensors)


class GroupNorms:
    """Squared sums over fixed, possibly overlapping groups of per-tensor values, planned once.

    groups: for each group, indices into the per-tensor vector. `sum_squares(sq)` returns the
    (n_groups,) group sums of `sq`; `__call__(tensors)` the groups' L2 norms.
    """

    def __init__(self, n_tensors: int, groups: Sequence[Sequence[int]]):
        members = [(i, g) for g, group in enumerate(groups) for i in group]
        if any(not 0 <= i < n_tensors for i, _ in members):
            raise ValueError("group index outside the tensor list")
        self.n_tensors, self.n_groups = n_tensors, len(groups)
        self.groups = [list(g) for g in groups]
        self._cpu = (
            torch.tensor([i for i, _ in members], dtype=torch.long),
            torch.tensor([g for _, g in members], dtype=torch.long),
        )
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._squares = SquaredNorms()

    def index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(tensor index, group index) on `device`, copied there once."""
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in self._cpu)
        return self._on[device]

    def sum_squares(self, sq: torch.Tensor) -> torch.Tensor:
        ti, gi = self.index(sq.device)
        total = torch.zeros(self.n_groups, dtype=sq.dtype, device=sq.device)
        return total.index_add_(0, gi, sq.index_select(0, ti))

    def __call__(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """(n_groups,) norms of the groups, for `tensors` aligned with the planned indices."""
        if len(tensors) != self.n_tensors:
            raise ValueError(f"expected {self.n_tensors} tensors, got {len(tensors)}")
        return self.sum_squares(self._squares(tensors)).sqrt()


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
        index.append(
            list(dict.fromkeys(idx))
        )  # a tensor twice in one group (tied weights) counts once
    return GroupNorms(len(tensors), index)(tensors)
