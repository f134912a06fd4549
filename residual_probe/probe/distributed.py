"""The probe across processes: which process group pools a step's token sums, the step's one
collective (an all-reduce of sums, or a gather of sums and maxima), and the rows of pipeline
stages gathered to the first stage and merged there.

Nothing here runs on one process: `parallel_groups` answers (None, 1) without an initialized
process group, and the Probe calls the rest only when it has a group.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .errors import ProbeError
from .gradnorm import is_dtensor
from .quantities.base import buffer_dtype


def fsdp_data_parallel(model: nn.Module):
    """(the FSDP2 mesh information of the model, or None): its data-parallel process group(s) and sizes."""
    try:
        from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
    except ImportError:
        return None
    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
            info = getattr(group, "mesh_info", None)
            if info is not None:
                return info
    return None


def parallel_groups(model: nn.Module, group: Any, pipeline: bool) -> tuple[Any, int]:
    """(the process group over which the step's token sums are pooled, or None; the number of
    data-parallel replicas whose gradients are averaged).

    Under FSDP2, with or without tensor parallelism on a second mesh dimension, the sums are pooled
    over every rank: ranks holding the same tokens (tensor-parallel replicas) add the same sums
    and the same token counts, ranks holding other tokens (data-parallel replicas, sequence
    shards) add theirs, so each ratio is the global token mean. Gradients are averaged over
    FSDP's mesh only (its shard and replicate dimensions), not over the tensor-parallel one.
    With a pipeline the stages hold different blocks, so only a data-parallel group pools.
    """
    import torch.distributed as dist

    if group != "auto":
        return group, (dist.get_world_size(group) if group is not None else 1)
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.process_group, dist.get_world_size(model.process_group)
    info = fsdp_data_parallel(model)
    if info is not None:
        size = getattr(info, "shard_mesh_size", 1) * getattr(info, "replicate_mesh_size", 1)
        if not pipeline:
            return dist.group.WORLD, size
        if (
            info.mesh.ndim != 1
            or size != dist.get_world_size(info.mesh.get_group())
            or any(is_dtensor(p) and p.device_mesh.ndim > 1 for p in model.parameters())
        ):
            raise ProbeError(
                "pipeline_group with HSDP or tensor parallelism: pass group= (the process group over "
                "which this stage's ranks hold other tokens of the same blocks)"
            )
        return info.mesh.get_group(), size
    if not pipeline and any(is_dtensor(p) for p in model.parameters()):  # tensor parallelism alone
        return dist.group.WORLD, 1
    return None, 1


def group_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def reduce_step(
    group: Any,
    pooled: list[torch.Tensor | None],
    shared: list[torch.Tensor],
    maxima: list[torch.Tensor | None] = (),
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """The step's one collective over `group`: the quantities' pooled sums (None where a
    quantity pools nothing) and the sharded gradient squares `shared` are summed, the quantities'
    `maxima` maximized. Without maxima that is one all_reduce(SUM) of the concatenated sums. A
    maximum cannot ride a sum, so with maxima every rank's packed vector [sums..., maxima...] is
    gathered by one all_gather_into_tensor (world x n floats: the vector is a few numbers per
    block) and reduced here, in rank order, the same on every rank. Returns (sums, maxima)
    reduced; `shared` is reduced in place. NaN propagates through both."""
    maxima = list(maxima) or [None] * len(pooled)
    sums = [p for p in pooled if p is not None]
    peaks = [m for m in maxima if m is not None]
    if group is None or not (sums or shared or peaks):
        return pooled, maxima
    import torch.distributed as dist

    device = (sums or shared or peaks)[0].device
    parts = sums + shared
    n_sum = sum(p.numel() for p in parts)
    flat = torch.cat([p.to(device, buffer_dtype(device)).reshape(-1) for p in parts + peaks])
    if peaks:
        every = all_gather_flat(flat, group)  # (world, n)
        flat = torch.cat([every[:, :n_sum].sum(0), every[:, n_sum:].amax(0)])
    else:
        dist.all_reduce(flat, group=group)
    it = iter(flat.split([p.numel() for p in parts + peaks]))
    pooled = [None if p is None else next(it) for p in pooled]
    for v in shared:
        v.copy_(next(it))
    maxima = [None if m is None else next(it) for m in maxima]
    return pooled, maxima


def all_gather_flat(flat: torch.Tensor, group: Any) -> torch.Tensor:
    """(world, n): every rank's 1-D `flat` (n floats), by one collective: all_gather_single
    (torch >= 2.13) or all_gather_into_tensor, its older name, into a flat (world * n) buffer
    (gloo takes no other shape)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, flat, group=group)
    return out.view(world, -1)


def gather_stage_rows(group: Any, rows: list[dict]) -> tuple[list[dict], float]:
    """Pipeline stages: every stage's rows to the group's first rank (one gather_object).
    Returns (on the first rank: the merged rows of every stage, and the other stages' count of
    non-finite values; elsewhere: `rows` unchanged, and 0)."""
    import torch.distributed as dist

    first = 0 if group is dist.group.WORLD else dist.get_global_rank(group, 0)
    mine = dist.get_rank(group)
    got = [None] * dist.get_world_size(group) if mine == 0 else None
    dist.gather_object(rows, got, dst=first, group=group)
    if mine != 0:
        return rows, 0
    others = sum(r["value"] for other in got[1:] for r in other if r["metric"] == "nonfinite_count")
    return merge_stage_rows(got), others


def merge_stage_rows(stages: list[list[dict]]) -> list[dict]:
    """One model's rows from the rows of its pipeline stages (each holding other blocks): block
    rows as they are; whole-model gradient norms (stack "model", param_grad_norm) as the root of
    the stages' summed squares; the counts summed; w2_grad_norm from the stage holding the
    stack's last block (each stage reports its own last block). In step order, stages in order
    within a step."""
    out: list[dict] = []
    combined: dict[tuple, dict] = {}
    last = {}  # (step, stack) -> the highest block index with a w2_grad_norm row
    for rows in stages:
        for r in rows:
            if r["metric"] == "w2_grad_norm":
                last[r["step"], r["stack"]] = max(
                    last.get((r["step"], r["stack"]), r["layer"]), r["layer"]
                )
    for rows in stages:
        for r in rows:
            if r["metric"] == "w2_grad_norm" and r["layer"] != last[r["step"], r["stack"]]:
                continue
            norm = r["stack"] == "model" and r["metric"] == "param_grad_norm"
            if not norm and r["metric"] not in ("nonfinite_count", "no_grad_count"):
                out.append(r)
                continue
            key = (r["step"], r["stack"], r["layer"], r["sublayer"], r["stream"], r["metric"])
            have = combined.get(key)
            if have is None:
                combined[key] = dict(r)
            else:
                have["value"] = (
                    math.hypot(have["value"], r["value"]) if norm else have["value"] + r["value"]
                )
    out += combined.values()
    out.sort(
        key=lambda r: r["step"]
    )  # stable: within a step, blocks by stage, then the combined rows
    return out
