"""The probe: attach to any Transformer, in your own training loop, and get per-layer tables.

    probe = Probe(model, quantities=("param_grad_norm", "forward_stats"), every=10, sink="run.csv")
    with probe:
        for batch in data:
            loss = loss_fn(model(*batch.inputs), batch.targets)
            loss.backward()
            probe.step()          # after backward (and all micro-batches), before clipping
            clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
    df = pandas.DataFrame(probe.rows())

When each quantity is taken (docs/design.md, section 2 "What is measured"):
- param_grad_norm, w2_grad_norm: read from `.grad` when `probe.step()` is called, i.e. the
  gradient accumulated over all micro-batches of the step, before clipping if `step()` is
  called before `clip_grad_norm_`. Under DDP it is the synchronized (averaged) gradient;
  under FSDP2 the global norm of the sharded gradient.
- act_grad_norm: RMS over tokens of ||dL/dh_k||, pooled over every token of every backward
  in the step (all micro-batches), each seeing the loss it was backpropagated from (a loss
  divided by the number of micro-batches gives gradients divided by it too). Across
  data-parallel ranks it is pooled as the gradient of the averaged loss (DDP/FSDP average).
- forward statistics: token means over every forward of the step (micro-batches and ranks
  pooled); block_influence and angular_distance are computed from the pooled cos_adjacent.
  Forwards run inside backward (activation-checkpoint recomputation) are skipped.
- subsample: a seeded draw of `subsample_tokens` token positions from the first forward of
  each scheduled step, the same positions for every layer of a stack.

`probe.step()` is a collective under DDP/FSDP: call it on every rank.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..analysis import metrics
from .discovery import BlockInfo, find_blocks, is_norm
from .gradnorm import GroupNorms
from .records import RowSink, row
from .schedule import FORWARD, PARAM, QUANTITIES, ProbeError, Schedule, ScheduleSpec
from .stats import ACT, FORWARD_METRICS, Accumulator, block_forward_stats, grad_sq_sum, stream_tensors

PARAM_GROUPS = ("attention", "ffn", "norm", "other")


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation-checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


def _param_group(name: str, module_of: dict[str, nn.Module], sublayers: Iterable[str]) -> str:
    """attention / ffn / norm / other for a parameter path inside a block."""
    owner = name.rpartition(".")[0]
    if owner in module_of and is_norm(module_of[owner]):
        return "norm"
    if any("attn" in part or "attention" in part for part in name.lower().split(".")[:-1]):
        return "attention"
    if any(name.startswith(s + ".") for s in sublayers):
        return "ffn"
    return "other"


def _data_parallel_group(model: nn.Module, group: Any):
    """The process group across which gradients are averaged, or None on one process."""
    if group != "auto":
        return group
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.process_group
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return dist.group.WORLD
    return None


class Probe:
    """Per-layer gradient and representation statistics of any Transformer; see the module doc.

    quantities: names from QUANTITIES sharing the schedule `every`/`steps`, or a mapping
    {quantity: every-int | list of steps | callable(step) -> bool}.
    subsample_tokens: tokens kept per layer for pairwise metrics (similarity, CKA).
    blocks: module-path pattern naming the blocks (e.g. "model.layers.*") when discovery fails.
    sink: .csv or .jsonl path, rows appended and flushed every step ("{rank}" is replaced).
    group: "auto" (DDP/FSDP process group if any), None (no cross-rank pooling) or a group.
    keep_rows: keep rows in memory for `rows()`; turn off for long runs with a sink.
    """

    def __init__(self, model: nn.Module, quantities: Iterable[str] | Mapping[str, ScheduleSpec] = QUANTITIES,
                 every: ScheduleSpec = 1, steps: Iterable[int] | None = None, subsample_tokens: int = 256,
                 seed: int = 0, blocks: str | None = None, sink: str | None = None, start_step: int = 0,
                 group: Any = "auto", keep_rows: bool = True):
        if not isinstance(model, nn.Module):
            raise ProbeError(f"Probe needs a torch.nn.Module, got {type(model).__name__}")
        for name, value, low in (("subsample_tokens", subsample_tokens, 1), ("seed", seed, 0),
                                 ("start_step", start_step, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ProbeError(f"{name}: expected an integer >= {low}, got {value!r}")
        self.model = model
        self.schedule = Schedule(quantities, every, steps)
        self.subsample_tokens, self.seed = subsample_tokens, seed
        self.blocks: list[BlockInfo] = find_blocks(model, blocks)
        self._group = _data_parallel_group(model, group)
        self._grad_scale = 1.0
        rank = 0
        if self._group is not None:
            import torch.distributed as dist

            self._grad_scale = 1.0 / dist.get_world_size(self._group)  # DDP/FSDP average gradients
            rank = dist.get_rank()
        self._sink = RowSink(sink, rank) if sink is not None else None
        self._plan_parameters()
        self._acc = Accumulator([len(b.streams) for b in self.blocks])
        self._stack_len = {}
        for b in self.blocks:
            self._stack_len[b.stack] = max(self._stack_len.get(b.stack, 0), b.index + 1)
        self._handles: list = []
        self._tensor_handles: list = []
        self._rows: list[dict] | None = [] if keep_rows else None
        self._subsamples: dict[tuple[str, str], torch.Tensor] = {}
        self.subsample_step: int | None = None
        self.nonfinite_total = 0
        self._step = start_step
        self._begin_step()

    # ---- planning -----------------------------------------------------------------------

    def _plan_parameters(self) -> None:
        """Parameter groups per block, sublayer, parameter group and W2, normed in one pass."""
        refs: list[tuple[nn.Module, str]] = []  # (owner module, attribute): re-read each step (FSDP swaps them)
        index: dict[int, int] = {}
        groups, keys = [], []

        def idx(module: nn.Module, prefix: str) -> list[int]:
            out = []
            for name, p in module.named_parameters(prefix=prefix):
                if id(p) not in index:
                    owner_path, _, attr = name.rpartition(".")
                    index[id(p)] = len(refs)
                    refs.append((self._owner(owner_path), attr))
                out.append(index[id(p)])
            return list(dict.fromkeys(out))

        last_in_stack = {}
        for b in self.blocks:
            last_in_stack[b.stack] = b
        for b in self.blocks:
            keys.append(("param_grad_norm", b, "block"))
            groups.append(idx(b.module, b.name))
            for sub, mod in b.sublayers.items():
                keys.append(("param_grad_norm", b, sub))
                groups.append(idx(mod, f"{b.name}.{sub}"))
            module_of = dict(b.module.named_modules())
            by_group: dict[str, list[int]] = {}
            w2 = None
            for name, p in b.module.named_parameters():
                g = _param_group(name, module_of, b.sublayers)
                by_group.setdefault(g, []).append(index[id(p)])
                if g == "ffn" and p.dim() == 2 and name.endswith("weight"):
                    w2 = (name, index[id(p)])  # the last FFN matrix: fc2 / c_proj / down_proj / wo
            for g in PARAM_GROUPS:
                if g in by_group:
                    keys.append(("param_grad_norm", b, f"group:{g}"))
                    groups.append(by_group[g])
            if last_in_stack[b.stack] is b and w2 is not None:
                keys.append(("w2_grad_norm", b, w2[0].rpartition(".")[0]))
                groups.append([w2[1]])
        self._param_refs, self._param_keys = refs, keys
        self._param_norms = GroupNorms(len(refs), groups)

    def _owner(self, path: str) -> nn.Module:
        return self.model.get_submodule(path) if path else self.model

    # ---- attach / detach ----------------------------------------------------------------

    def attach(self) -> "Probe":
        """Register the forward hooks (only if a forward quantity is scheduled at all)."""
        if self._handles:
            return self
        if self.schedule.quantities & FORWARD:
            for pos, b in enumerate(self.blocks):
                self._handles.append(b.module.register_forward_hook(partial(self._on_forward, pos), with_kwargs=True))
        self._attached = True
        self._begin_step()
        return self

    def detach(self) -> "Probe":
        """Remove every hook and drop pending per-step state; the model is as before attach."""
        for h in self._handles + self._tensor_handles:
            h.remove()
        self._handles.clear()
        self._tensor_handles.clear()
        self._attached = False
        self._begin_step()
        if self._sink is not None:
            self._sink.close()
        return self

    def __enter__(self) -> "Probe":
        return self.attach()

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    @property
    def current_step(self) -> int:
        """The step the hooks are recording now (closed by the next `step()`)."""
        return self._step

    def _begin_step(self) -> None:
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()
        self._active = self.schedule.active(self._step)
        self._fwd_active = self._active & FORWARD if getattr(self, "_attached", False) else frozenset()
        self._acc.reset()
        self._token = object()  # tags this step's gradient hooks; a late backward is ignored
        self._sub_state: dict[str, dict] = {}

    # ---- hooks --------------------------------------------------------------------------

    def _on_forward(self, pos: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        active = self._fwd_active
        if not active or _in_backward():
            return
        b = self.blocks[pos]
        outs = stream_tensors(output, len(b.streams))
        if outs is None:
            return
        if ACT in active and torch.is_grad_enabled():
            for si, t in enumerate(outs):
                if t.requires_grad:
                    slot = self._acc.slot(pos, si, ACT)
                    self._tensor_handles.append(t.register_hook(partial(self._on_grad, slot, self._token)))
        if not active & {"forward_stats", "subsample"}:
            return
        ins = stream_tensors(args[0] if args else kwargs.get("hidden_states"), len(b.streams))
        if ins is None or any(i.shape != o.shape for i, o in zip(ins, outs)):
            return  # not a residual block in the sense of the metrics (shape changes)
        with torch.no_grad():
            if "forward_stats" in active:
                for si, (prev, cur) in enumerate(zip(ins, outs)):
                    n = cur.numel() // cur.shape[-1]
                    for metric, value in zip(FORWARD_METRICS, block_forward_stats(prev, cur)):
                        self._acc.add(self._acc.slot(pos, si, metric), value, n, n)
            if "subsample" in active:
                self._take_subsample(b, ins, outs)

    def _on_grad(self, slot: int, token: object, grad: torch.Tensor) -> None:
        if token is not self._token or grad is None:
            return
        n = grad.numel() // grad.shape[-1]
        self._acc.add(slot, grad_sq_sum(grad), self._grad_scale**2, n)

    def _take_subsample(self, b: BlockInfo, ins: tuple, outs: tuple) -> None:
        """Keep the same seeded token positions of every layer's output, from the step's first forward."""
        state = self._sub_state.get(b.stack)
        d = outs[0].shape[-1]
        n_tok = outs[0].numel() // d
        if b.index == 0 and state is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._step * 101 + len(self._sub_state))
            pick = torch.randperm(n_tok, generator=gen)[: self.subsample_tokens].sort().values
            state = {"pick": pick.to(outs[0].device), "n": n_tok, "done": False,
                     "rows": {s: [None] * (self._stack_len[b.stack] + 1) for s in b.streams}}
            for s, t in zip(b.streams, ins):
                state["rows"][s][0] = t.detach().reshape(-1, d).index_select(0, state["pick"]).float()
            self._sub_state[b.stack] = state
        if state is None or state["done"] or state["n"] != n_tok:
            return
        for s, t in zip(b.streams, outs):
            state["rows"][s][b.index + 1] = t.detach().reshape(-1, d).index_select(0, state["pick"]).float()
        state["done"] = b.index + 1 == self._stack_len[b.stack]

    # ---- export -------------------------------------------------------------------------

    def step(self) -> list[dict]:
        """Reduce this step's quantities to rows, write them to the sink, and start the next step.

        Call after backward (after all micro-batches) and before gradient clipping. Returns the
        step's rows. Under DDP/FSDP, call on every rank (it all-reduces).
        """
        s, active = self._step, self._active
        rows: list[dict] = []
        if active & PARAM:
            rows += self._param_rows(s, active)
        if active & {ACT, "forward_stats"} and self._handles:
            rows += self._forward_rows(s, active)
        if "subsample" in active:
            self._finish_subsample(s)
        if rows:
            bad = sum(1 for r in rows if not math.isfinite(r["value"]))
            self.nonfinite_total += bad
            rows.append(row(s, "-", -1, "-", "-", "nonfinite_count", float(bad)))
            if self._rows is not None:
                self._rows.extend(rows)
            if self._sink is not None:
                self._sink.write(rows)
        self._step = s + 1
        self._begin_step()
        return rows

    def _param_rows(self, s: int, active: frozenset) -> list[dict]:
        grads = [getattr(mod, attr).grad for mod, attr in self._param_refs]
        values = self._param_norms(grads).tolist()  # the one host sync of the step's gradient norms
        return [row(s, b.stack, b.index, sub, "-", metric, v)
                for (metric, b, sub), v in zip(self._param_keys, values) if metric in active]

    def _forward_rows(self, s: int, active: frozenset) -> list[dict]:
        device = next(iter(self.model.parameters())).device
        means, counts = self._acc.reduce(device, self._group)
        slot = self._acc.slot
        cos_slots = torch.tensor([slot(p, si, "cos_adjacent") for p, b in enumerate(self.blocks)
                                  for si in range(len(b.streams))], device=device)
        cos = means[cos_slots]
        derived = torch.stack([metrics.block_influence(cos), metrics.angular_distance(cos)]).tolist()
        means, counts = means.tolist(), counts.tolist()
        rows, j = [], 0
        for pos, b in enumerate(self.blocks):
            for si, stream in enumerate(b.streams):
                if "forward_stats" in active and counts[slot(pos, si, "cos_adjacent")] > 0:
                    for metric in FORWARD_METRICS:
                        rows.append(row(s, b.stack, b.index, "block", stream, metric, means[slot(pos, si, metric)]))
                    rows.append(row(s, b.stack, b.index, "block", stream, "block_influence", derived[0][j]))
                    rows.append(row(s, b.stack, b.index, "block", stream, "angular_distance", derived[1][j]))
                if ACT in active and counts[slot(pos, si, ACT)] > 0:
                    rows.append(row(s, b.stack, b.index, "block", stream, ACT, math.sqrt(means[slot(pos, si, ACT)])
                                    if means[slot(pos, si, ACT)] >= 0 else math.nan))
                j += 1
        return rows

    def _finish_subsample(self, s: int) -> None:
        out = {}
        for stack, state in self._sub_state.items():
            for stream, layers in state["rows"].items():
                if all(t is not None for t in layers):
                    out[(stack, stream)] = torch.stack(layers)
        if out:
            self._subsamples, self.subsample_step = out, s

    # ---- results ------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """All rows recorded so far (step, stack, layer, sublayer, stream, metric, value)."""
        if self._rows is None:
            raise ProbeError("rows were not kept (keep_rows=False); read the sink file instead")
        return list(self._rows)

    def subsamples(self) -> dict[tuple[str, str], torch.Tensor]:
        """{(stack, stream): (n_layers + 1, n_tokens, d) float32} from the last subsampled step.

        Row 0 is block 0's input (the embedding output), row k + 1 block k's output.
        """
        return dict(self._subsamples)
