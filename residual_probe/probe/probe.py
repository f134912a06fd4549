"""The probe: attach to any Transformer, in your own training loop, and get per-layer tables.

    probe = Probe(model, quantities=("param_grad_norm", "forward_stats"), every=10, sink="run.csv")
    with probe:
        for batch in data:
            loss = loss_fn(model(*batch.inputs), batch.targets)
            loss.backward()
            probe.step()          # after backward (and all micro-batches), before clipping
            clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
            if step % 50 == 0:
                with probe.paused():
                    validate(model)
    df = pandas.DataFrame(probe.rows())

What each quantity is and when it is taken is said in its own module under `quantities/`
(and in the README, "Probing your own model"). The Probe only coordinates: it finds the blocks,
owns the forward hooks (one per block, shared by every forward quantity; `hooks.py`), the step
counter, the one device-to-host copy per recorded step, the one collective across data-parallel
ranks and the gather of pipeline stages (`distributed.py`) and the sinks. Forward quantities see only *training* forwards: a module in training mode with grad
enabled, outside `probe.paused()` and outside activation-checkpoint recomputation; eval-mode
and no_grad forwards count only with `include_eval=True`.

`probe.step()` is a collective under DDP/FSDP/tensor parallelism and with `pipeline_group`:
call it on every rank.
"""

from __future__ import annotations

import gc
import math
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .discovery import BlockInfo, find_blocks
from .distributed import (
    gather_stage_rows,
    global_rank,
    group_size,
    parallel_groups,
    reduce_step,
)
from .errors import ProbeError
from .gradnorm import RankSums, is_dtensor
from .hooks import BlockHooks, compiled_modules, in_backward
from .params import ParamPlan
from .quantities import DEFAULT_QUANTITIES, REGISTRY, Quantity
from .quantities.base import buffer_dtype
from .records import RowSink, row
from .schedule import Schedule, ScheduleSpec
from .stats import local_streams, stream_tensors


def amp_scales(scaler) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(scale dividing .grad or None, scale dividing activation gradients or None) of a GradScaler.

    Enabled or not is asked through its public `is_enabled()`. The scale is read as the scaler's
    own tensor, not through the public `get_scale()`, which returns a float by a device-to-host
    sync (a second one per step, and one that defer=True exists to avoid); whether `unscale_` ran
    this step has no public accessor. Both private reads are here and nowhere else."""
    if scaler is None or not scaler.is_enabled():
        return None, None
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # no scale() call yet: nothing was scaled
        return None, None
    states = getattr(scaler, "_per_optimizer_states", {}) or {}
    unscaled = any(getattr(st.get("stage"), "name", "") == "UNSCALED" for st in states.values())
    return (None if unscaled else scale), scale


class _Setup:
    """What every quantity may read: blocks, parameter plan, options. Fixed after construction."""

    def __init__(self, blocks, params, subsample_tokens, seed, grad_average):
        self.blocks: list[BlockInfo] = blocks
        self.params: ParamPlan = params
        self.subsample_tokens, self.seed = subsample_tokens, seed
        self.grad_average = grad_average  # 1 / world size under DDP/FSDP (they average gradients)


class _StepContext:
    """Per-export helpers: the shared per-parameter squared gradient norms, AMP unscaling, and the
    sharded squared sums that join the step's one collective (`sums`; None on one process).
    Quantities take gradient squares in `pooled()`, before that collective; they are complete
    from `values()` on."""

    def __init__(self, probe: "Probe", step: int, sums: RankSums | None = None):
        self.probe, self.step, self.sums = probe, step, sums
        self._grad_sq = None
        self.device: torch.device | None = None

    def grad_squares(self):
        if self._grad_sq is None:
            self._grad_sq = self.probe._params.grad_squares(self.sums)
        return self._grad_sq

    def _scale(self):
        return amp_scales(self.probe.scaler)

    def unscale_params(self, norms: torch.Tensor) -> torch.Tensor:
        scale = self._scale()[0]
        return norms if scale is None else norms / scale.to(norms.device, norms.dtype)

    def unscale_act_sq(self, sums: torch.Tensor) -> torch.Tensor:
        scale = self._scale()[1]
        return sums if scale is None else sums / scale.to(sums.device, sums.dtype).square()


class Probe:
    """Per-layer gradient and representation statistics of any Transformer; see the module doc.

    quantities: names from QUANTITIES sharing the schedule `every`/`steps`, or a mapping
        {quantity: every-int | list of steps | callable(step) -> bool}. Default: all but update_ratio.
    subsample_tokens: tokens kept per layer for pairwise metrics (similarity, CKA).
    blocks: module-path pattern naming the blocks (e.g. "model.layers.*") when discovery fails.
    sink: .csv or .jsonl path, rows appended (never truncated) and flushed every step; "{rank}" is
        replaced, and every rank writes its own file; without "{rank}" only rank 0 writes (under
        DDP/FSDP/tensor parallelism every rank has the same rows; with pipeline_group rank 0 has all).
    start_step: the first step's number (a resumed run continues its sink).
    group: "auto" (DDP/FSDP process group if any), None (no cross-rank pooling) or a group.
        Under FSDP2 and tensor parallelism (DTensor parameters, 2-D mesh) "auto" pools the token
        sums over every rank: tensor-parallel replicas add equal sums and counts, sequence
        shards their own tokens, so the means are global. DTensor block outputs are read as
        their local tensors (replicated, or sharded on a token dimension); the gradient norms
        sum squares over every mesh dimension that shards a parameter.
    pipeline_group: with `torch.distributed.pipelining`, the process group of the stages (one
        rank per stage; `torch.distributed.group.WORLD` for a pipeline alone). Give each stage
        its own module with the blocks it holds, named by their global index (a ModuleDict
        "0".."N-1" with the others deleted, or a ModuleList with the others replaced by
        nn.Identity): rows carry that index. At each recorded `step()` the stages' rows are
        gathered to the group's first rank once (one gather_object of the host rows, never in
        a hook); its `rows()` and sink hold every block, with the whole-model rows (stack
        "model") combined over the stages (root of the summed squares; a weight tied across
        stages would count twice) and the counts summed; the other stages keep their own rows
        and write no sink. `flush()`/`detach()` gather too (call them on every stage). Not with
        defer=True. act_grad_norm is the gradient of the loss the schedule backpropagates:
        with the default `scale_grads=True` each micro-batch's own mean loss (n_microbatches
        times the gradient of the mean loss); pass scale_grads=False and a loss_fn divided by
        n_microbatches to get the single-process numbers.
    keep_rows: keep rows in memory for `rows()`; turn off for long runs with a sink.
    include_eval: also record forwards of modules in eval mode or under no_grad (validation,
        generate(), a frozen model being inspected). By default only training forwards count.
    scaler: the torch.amp.GradScaler of the loop, if any: gradient norms are recorded unscaled.
    optimizer: the optimizer, for update_ratio (or `probe.track_optimizer(opt)` later).
    w2: path of the FFN output weight inside a block (e.g. "mlp.down_proj") when the family's
        name is not known or is ambiguous (mixture of experts).
    defer: export each step's rows one step late: the device-to-host copy is started
        non-blocking into pinned memory at step() and read at the next step() (or flush()),
        so step() never waits for the device.
    forward_every: the quantities marked `sparse` (forward_stats, subsample: several kernels per
        block) only on every n-th recorded step, the first at or after `start_step`, and
        `last_step`; 1 (default): on every recorded step. Only with a shared integer `every`
        (schedule.FORWARD_EVERY is what the integrations and `train` use).
    last_step: the run's last recorded step, if known, for `forward_every` (collapse at the end).
    """

    def __init__(
        self,
        model: nn.Module,
        quantities: Iterable[str] | Mapping[str, ScheduleSpec] = DEFAULT_QUANTITIES,
        every: ScheduleSpec = 1,
        steps: Iterable[int] | None = None,
        subsample_tokens: int = 256,
        seed: int = 0,
        blocks: str | None = None,
        sink: str | None = None,
        start_step: int = 0,
        group: Any = "auto",
        keep_rows: bool = True,
        include_eval: bool = False,
        scaler: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        w2: str | None = None,
        defer: bool = False,
        pipeline_group: Any = None,
        forward_every: int = 1,
        last_step: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ProbeError(f"Probe needs a torch.nn.Module, got {type(model).__name__}")
        for name, value, low in (
            ("subsample_tokens", subsample_tokens, 1),
            ("seed", seed, 0),
            ("start_step", start_step, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ProbeError(f"{name}: expected an integer >= {low}, got {value!r}")
        compiled = compiled_modules(model)
        if compiled:
            raise ProbeError(
                f"{compiled[0]} is already torch.compile'd, and hooks added after compiling are ignored "
                "(pytorch#117758): attach the probe to the plain model, then compile it: "
                "probe = Probe(model).attach(); model = torch.compile(model)"
            )
        if scaler is not None and not hasattr(scaler, "is_enabled"):
            raise ProbeError(
                f"scaler: expected a torch.amp.GradScaler, got {type(scaler).__name__}"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ProbeError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.model = model
        self.schedule = Schedule(
            quantities,
            every,
            steps,
            known=REGISTRY,
            sparse=[name for name, q in REGISTRY.items() if q.sparse],
            forward_every=forward_every,
            start=start_step,
            last=last_step,
        )
        self.subsample_tokens, self.seed = subsample_tokens, seed
        self.include_eval = bool(include_eval)
        self.scaler, self.optimizer, self.defer = scaler, optimizer, bool(defer)
        self.start_step = start_step
        self.blocks: list[BlockInfo] = find_blocks(model, blocks)
        self._pipeline = pipeline_group
        if pipeline_group is not None and self.defer:
            raise ProbeError(
                "pipeline_group: defer=True is not supported (the stages' rows are gathered at step())"
            )
        self._group, replicas = parallel_groups(model, group, pipeline_group is not None)
        self._world = 1 if self._group is None else group_size(self._group)
        grad_average = 1.0 / replicas  # DDP/FSDP average gradients over their replicas
        rank = global_rank()
        explicit = not isinstance(quantities, (tuple, list)) or quantities is not DEFAULT_QUANTITIES
        strict_w2 = "w2_grad_norm" in self.schedule.rules and explicit
        self._params = ParamPlan(
            model, self.blocks, w2, strict_w2, want_w2="w2_grad_norm" in self.schedule.rules
        )
        setup = _Setup(self.blocks, self._params, subsample_tokens, seed, grad_average)
        self.quantities: list[Quantity] = [
            REGISTRY[name](setup, self.schedule.rules[name])
            for name in REGISTRY
            if name in self.schedule.rules
        ]
        self._forward_qs = [q for q in self.quantities if q.uses_forward]
        if "update_ratio" in self.schedule.rules and any(
            is_dtensor(p) for p in self._params.tensors()
        ):
            raise ProbeError(
                "update_ratio is not supported under FSDP2 or tensor parallelism (DTensor parameters) "
                "yet; leave it out"
            )
        writes = sink is not None and (
            rank == 0 or "{rank}" in str(sink)
        )  # one file per replica set
        self._sink = RowSink(sink, rank) if writes else None
        self._hooks = BlockHooks(self, self.blocks)
        self._attached = False
        self._paused = 0
        self._rows: list[dict] | None = [] if keep_rows else None
        self.nonfinite_total = 0
        self._skipped_eval = 0
        self._said: set[str] = set()
        self._deferred: tuple | None = None
        self._step = start_step
        self._begin_step()

    # ---- attach / detach ----------------------------------------------------------------

    def attach(self) -> "Probe":
        """Register the hooks: one forward hook per block (if a forward quantity is scheduled at all)."""
        if self._attached:
            return self
        self._hooks.attach(forward=bool(self._forward_qs))
        self._attached = True
        for q in self.quantities:
            q.attach(self)
        self._begin_step()
        return self

    def detach(self) -> "Probe":
        """Remove every hook, export what is pending, drop per-step state; the model is as before attach."""
        self._hooks.detach()
        was = self._attached
        self._attached = False
        self.flush()
        for q in self.quantities:
            q.detach()
        if was:
            self._begin_step()
        if self._sink is not None:
            self._sink.close()
        return self

    def __enter__(self) -> "Probe":
        return self.attach()

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    @contextmanager
    def paused(self):
        """Inside, the hooks record nothing (validation, generation, anything not part of the step)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> "Probe":
        """Measure update_ratio around this optimizer's steps (for loops whose optimizer is made later)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ProbeError(
                f"track_optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        q = self.quantity("update_ratio")
        if q is not None:
            q.detach()
            if self._attached:
                q.attach(self)
        return self

    @property
    def current_step(self) -> int:
        """The step the hooks are recording now (closed by the next `step()`)."""
        return self._step

    def _begin_step(self) -> None:
        for q in self.quantities:
            q.begin(self._step)
        self._fwd_active = [q for q in self._forward_qs if q.is_active] if self._attached else []

    # ---- the forward hook ------------------------------------------------------------------

    def records_forward(self, module: nn.Module) -> bool:
        """Whether a forward of `module` running now belongs to the step's record: the probe not
        paused, not a backward's recomputation (activation checkpointing), and a training
        forward (module in training mode, grad enabled) unless include_eval. The quantities with
        hooks of their own (attention, the output head) ask this, as the blocks' hook does."""
        if self._paused or in_backward():
            return False
        return self.include_eval or (module.training and torch.is_grad_enabled())

    def _on_forward(
        self, pos: int, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        active = self._fwd_active
        if not active or self._paused or in_backward():
            return
        if not self.records_forward(module):
            self._skipped_eval += 1  # an evaluation forward: not part of the training step
            return
        b = self.blocks[pos]
        outs = stream_tensors(output, len(b.streams), b.stacked)
        if outs is None:
            return
        ins = stream_tensors(
            args[0] if args else kwargs.get("hidden_states"), len(b.streams), b.stacked
        )
        local_outs = local_streams(outs)  # DTensors (tensor parallelism): this rank's tokens
        if ins is not None:
            ins = local_streams(ins)
        if local_outs is None:
            self._say(
                "dtensor",
                f"probe: the output of {b.name} is a DTensor sharded on its features (or a pending "
                "Partial sum): its forward statistics are not recorded",
            )
        if (
            ins is not None
            and local_outs is not None
            and any(i.shape != o.shape for i, o in zip(ins, local_outs))
        ):
            ins = None  # not a residual transition in the sense of the metrics (shape changes)
        for q in active:
            if q.wants_dtensor:  # a gradient hook on the DTensor's own autograd node
                q.forward(pos, b, ins, outs)
            elif local_outs is not None:
                q.forward(pos, b, ins, local_outs)

    # ---- export -------------------------------------------------------------------------

    def step(self) -> list[dict]:
        """Reduce this step's quantities, write their rows to the sink, and start the next step.

        Call after backward (after all micro-batches), before gradient clipping, and with a
        GradScaler either before `scaler.unscale_` or after it (never after `scaler.update()`).
        Returns the rows exported by this call: this step's, or with defer=True the previous
        step's. At most one device-to-host copy; none on a step where nothing is scheduled.
        Under DDP/FSDP, call on every rank (it runs the step's one collective).
        """
        with _gc_paused():
            return self._step_export()

    def _step_export(self) -> list[dict]:
        s = self._step
        ctx = _StepContext(self, s, None if self._group is None else RankSums(self._world))
        pooled = [q.pooled(ctx) for q in self.quantities]
        maxima = [q.maxima(ctx) for q in self.quantities]
        shared = ctx.sums.vectors if ctx.sums is not None else []  # sharded gradient squares
        pooled, maxima = reduce_step(self._group, pooled, shared, maxima)
        ctx.sums = None  # squares first taken after this point reduce themselves (correct, one more collective)
        # `maxima` only where a quantity has some: a quantity written as values(ctx, pooled) keeps working
        values = [
            q.values(ctx, p) if m is None else q.values(ctx, p, m)
            for q, p, m in zip(self.quantities, pooled, maxima)
        ]
        alone = self._pipeline is None  # with a pipeline, rows are recorded once gathered
        rows = self._collect(record=alone)  # the previous step's, when deferred
        exported = [(q, v) for q, v in zip(self.quantities, values) if v is not None]
        if exported:
            device = exported[0][1].device
            flat = torch.cat([v.to(device, buffer_dtype(device)) for _, v in exported])
            self._deferred = (s, [(q, v.numel()) for q, v in exported], _to_host(flat, self.defer))
            if not self.defer:
                rows += self._collect(record=alone)
        if not alone and (exported or any(q.is_active for q in self.quantities)):
            rows = self._record(
                self._gather(rows)
            )  # once per recorded step, the same on every stage
        self._warn_skipped()
        self._step = s + 1
        self._begin_step()
        return rows

    def flush(self) -> list[dict]:
        """Export what is pending (a deferred step, updates measured since the last step())."""
        alone = self._pipeline is None
        rows = self._collect(record=alone)
        ctx = _StepContext(self, self._step - 1)
        values = [(q, q.values(ctx, None)) for q in self.quantities if q.name == "update_ratio"]
        values = [(q, v) for q, v in values if v is not None]
        if values:
            flat = torch.cat([v.double() for _, v in values])
            self._deferred = (
                self._step - 1,
                [(q, v.numel()) for q, v in values],
                _to_host(flat, False),
            )
            rows += self._collect(record=alone)
        if not alone and self._flush_gathers:
            rows = self._record(self._gather(rows))
        return rows

    _flush_gathers = (
        True  # flush() is a collective with pipeline_group (off once detached by a failure)
    )

    def _gather(self, rows: list[dict]) -> list[dict]:
        """Pipeline stages: every stage's rows merged on the group's first rank."""
        rows, others_nonfinite = gather_stage_rows(self._pipeline, rows)
        self.nonfinite_total += others_nonfinite
        return rows

    def _record(self, rows: list[dict]) -> list[dict]:
        if rows:
            if self._rows is not None:
                self._rows.extend(rows)
            if self._sink is not None:
                self._sink.write(rows)
        return rows

    def _collect(self, record: bool = True) -> list[dict]:
        if self._deferred is None:
            return []
        s, parts, host = self._deferred
        self._deferred = None
        host = host() if callable(host) else host
        rows, at = [], 0
        for q, n in parts:
            rows += q.rows(s, host[at : at + n])
            at += n
        if rows:
            no_grad = sum(getattr(q, "no_grad", 0) for q, _ in parts)
            if no_grad:
                self._say(
                    "no_grad",
                    f"probe: {no_grad} parameter group(s) had no .grad at step {s} (frozen, not used "
                    "by the loss, or step() before backward): recorded as NaN and counted in no_grad_count",
                )
                rows.append(row(s, "-", -1, "-", "-", "no_grad_count", float(no_grad)))
            bad = sum(1 for r in rows if not math.isfinite(r["value"])) - no_grad
            self.nonfinite_total += bad
            if any(
                r["step"] == s for r in rows
            ):  # not for an export of the previous step's update ratios alone
                rows.append(row(s, "-", -1, "-", "-", "nonfinite_count", float(bad)))
            if record:
                self._record(rows)
        return rows

    def _say(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            warnings.warn(message, stacklevel=4)

    def _warn_skipped(self) -> None:
        if self._skipped_eval:
            self._say(
                "eval",
                f"probe: {self._skipped_eval} forward(s) of blocks in eval mode or under no_grad were "
                "not recorded (pass include_eval=True to record them, or probe.paused() to silence this)",
            )
        self._skipped_eval = 0

    # ---- results ------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """All rows recorded so far (step, stack, layer, sublayer, stream, metric, value)."""
        if self._rows is None:
            raise ProbeError("rows were not kept (keep_rows=False); read the sink file instead")
        self._collect()
        return list(self._rows)

    def summary(self) -> dict[str, float]:
        """The last recorded step as a few grouped scalars for any logger (`probe.scalars.summary`; needs keep_rows)."""
        from .scalars import summary

        return summary(self.rows())

    def subsamples(self) -> dict[tuple[str, str], torch.Tensor]:
        """{(stack, stream): (n_layers + 1, n_tokens, d) float32} from the last subsampled step.

        Row 0 is block 0's input (the embedding output), row k + 1 block k's output; on the
        activations' device. Copies: the probe reuses its own buffers for later draws.
        """
        q = self.quantity("subsample")
        return {k: v.clone() for k, v in q.last.items()} if q is not None else {}

    @property
    def subsample_step(self) -> int | None:
        q = self.quantity("subsample")
        return q.last_step if q is not None else None

    def state_bytes(self) -> int:
        """Bytes the probe holds in tensors between steps (buffers, subsample, update snapshot)."""
        return sum(q.state_bytes() for q in self.quantities)

    @property
    def parts(self):
        """The parameters outside the blocks by part (`params.Parts`: keys, names, `without_grad()`)."""
        return self._params.parts

    @property
    def plans_built(self) -> int:
        """How many times the parameter-norm plan (buckets, index tensors) was built (1 in a steady loop)."""
        return self._params.plans_built

    def quantity(self, name: str) -> Quantity | None:
        """This probe's instance of the quantity `name` (None when not recorded): where a quantity
        registered from outside (`quantities.REGISTRY`) keeps its state for its owner to read."""
        return next((q for q in self.quantities if q.name == name), None)


@contextmanager
def _gc_paused():
    """Python's cyclic garbage collector held off while `step()` runs. Its temporaries (a 0-d
    tensor per parameter from _foreach_norm, the gradients' Python wrappers) die before it
    returns; counted by a running collector they triggered ~35 extra passes a step at 12k
    parameters, promoting the training step's live objects until a full collection (220 ms at
    544k objects) ran every other step. Restored on exit, also on error; a disabled collector
    stays disabled."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _to_host(flat: torch.Tensor, defer: bool):
    """The host floats of `flat`: now (one blocking copy), or a callable that reads them later."""
    if flat.device.type == "cpu":
        return flat.tolist()
    if not defer:
        return flat.cpu().tolist()  # the one device-to-host copy of the step
    pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    pinned.copy_(flat, non_blocking=True)
    event = torch.cuda.Event() if flat.device.type == "cuda" else None
    if event is not None:
        event.record()

    def read():
        if event is not None:
            event.synchronize()  # long done by the next step: the copy ran while the step computed
        return pinned.tolist()

    return read
