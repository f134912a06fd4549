"""The probe in a Hugging Face `Trainer` run: one line, `callbacks=[ProbeCallback()]`.

    from residual_probe.integrations.hf import ProbeCallback
    probe_cb = ProbeCallback(quantities=("param_grad_norm", "act_grad_norm", "forward_stats"))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[probe_cb])
    trainer.train()
    rows = probe_cb.probe.rows()              # also in <output_dir>/probe.csv

What is recorded, and when:
- One probe step per optimizer step (with gradient accumulation: the gradient accumulated over
  all micro-batches). Probe step s is the optimizer step that takes `state.global_step` from
  s - 1 to s: the Trainer's numbering, so the probe's step, `global_step` and the step the
  loggers show are one number (the first update is step 1; `every=10` records steps 10, 20, ...).
- Gradients are read BEFORE clipping. The Trainer clips between the last backward and its
  `on_pre_optimizer_step` event, so every callback event sees clipped gradients when
  `max_grad_norm > 0` (the default 1.0). The callback therefore records at the end of the last
  micro-batch's backward pass: a post-accumulate-grad hook on the parameters notices the
  backward of the micro-batch on which the Trainer syncs gradients (accelerate's
  `GradientState.sync_gradients`) and queues an autograd-engine callback that runs when that
  backward ends. It re-queues itself once, so that it runs after every callback queued while
  the graph executed (DDP's gradient all-reduce, FSDP's reduce-scatter) and reads the
  synchronized gradient. Nothing runs between that point and the Trainer's clipping.
- The summaries (`residual_probe.probe.scalars`: per-block gradient norm and block influence,
  first/last ratio, decay rate, late adjacent cosine; about 30 keys for 12 blocks) are added to
  the Trainer's logs at every `logging_steps`, so `report_to` (TensorBoard, W&B, ...) and
  `trainer.state.log_history` show them: each key's value at the last recorded step, and under
  `probe_max/...` its largest value over the steps since the previous log (a spike between two
  logs shows). For that the callback moves itself ahead of the
  reporting callbacks in the Trainer's callback list (they are created first and would log
  before it could add its keys).
- Sink: `<output_dir>/probe.csv` by default (process 0 only), with probe_run.json beside it;
  `sink=None` for none.

Under fp16 mixed precision the Trainer's gradient scaler is handed to the probe, which divides
the still-scaled gradients by the loss scale (not exercised by the CPU tests). DeepSpeed keeps
gradients outside `.grad` and is not supported.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from . import require

_transformers = require("transformers", "hf", "residual_probe.integrations.hf")
require("accelerate", "hf", "the Hugging Face Trainer")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import CallbackHandler  # noqa: E402

from ..probe import Probe  # noqa: E402
from .common import (  # noqa: E402 (re-exported)
    AUTO,
    FORWARD_EVERY,
    CallbackCore,
    sink_path,
)


def _sync_gradients() -> bool:
    """True on the micro-batch after which the Trainer clips and steps (accelerate's shared state)."""
    from accelerate.state import GradientState

    return bool(GradientState().sync_gradients)


def _caller_handler(callback) -> CallbackHandler | None:
    """The CallbackHandler that is calling `callback` right now (found on the call stack)."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler) and any(c is callback for c in owner.callbacks):
            return owner
        frame = frame.f_back
    return None


class ProbeCallback(CallbackCore, TrainerCallback):
    """Records the probe once per optimizer step, before clipping; see the module doc.

    sink: "auto" (`<output_dir>/probe.csv`), a .csv/.jsonl path (written by process 0 unless it
    holds "{rank}"), or None.
    log_summaries: add `probe/...` summaries to the Trainer's logs at `logging_steps`.
    forward_every: forward statistics on every n-th recorded step (`CallbackCore.probe_options`).
    **probe_kwargs: passed to `Probe` (quantities, every, steps, blocks, subsample_tokens, keep_rows, ...).
    """

    def __init__(
        self,
        sink: str | os.PathLike | None = AUTO,
        log_summaries: bool = True,
        forward_every: int = FORWARD_EVERY,
        **probe_kwargs: Any,
    ):
        super().__init__(sink, log_summaries, forward_every, **probe_kwargs)
        self._hooks: list = []
        self._state = None
        self._queued_task = None
        self._warned_fallback = False

    # ---- set-up -------------------------------------------------------------------------

    def _go_first(self) -> None:
        handler = _caller_handler(self)
        if handler is None:
            if self.log_summaries:
                warnings.warn(
                    "ProbeCallback: could not find the Trainer's callback list; the probe summaries "
                    "reach report_to loggers only if the callback is listed before them",
                    stacklevel=3,
                )
            return
        if handler.callbacks[0] is not self:
            # Reporting callbacks come first in the list and log a step's `logs` before later callbacks
            # see them; going first lets on_log add the probe keys in time. (Moving an element to the
            # front during the handler's loop keeps the loop's next element: nothing is called twice.)
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)

    def on_init_end(self, args, state, control, **kwargs):
        self._go_first()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._go_first()
        self._teardown()
        self.sink_path = sink_path(self.sink, args.output_dir, state.is_world_process_zero)
        sink = str(self.sink_path) if self.sink_path is not None else None
        kwargs_probe = self.probe_options()
        if "group" not in kwargs_probe:
            import torch.distributed as dist

            # The Trainer hands callbacks the unwrapped model, so the probe cannot see DDP itself.
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                kwargs_probe["group"] = dist.group.WORLD
        scaler = getattr(optimizer, "scaler", None)  # accelerate's GradScaler under fp16
        if (
            "scaler" not in kwargs_probe
            and scaler is not None
            and getattr(scaler, "is_enabled", lambda: False)()
        ):
            kwargs_probe["scaler"] = (
                scaler  # the backward just ended: .grad is still scaled; the probe divides
            )
        # the step being taken is global_step + 1 (the Trainer's numbering of updates)
        self.probe = Probe(
            model, sink=sink, start_step=state.global_step + 1, **kwargs_probe
        ).attach()
        self.start_run_info(model, "residual_probe.integrations.hf.ProbeCallback")
        self._state = state
        self._recorded_step = None
        self.reset()
        for p in model.parameters():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_accumulated))

    def _teardown(self) -> None:
        self.close_run_info()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.probe is not None:
            self.probe.detach()

    # ---- recording: at the end of the last micro-batch's backward -------------------------

    def _on_grad_accumulated(self, param: torch.Tensor) -> None:
        if not _sync_gradients():
            return
        task = torch._C._current_graph_task_id()
        if task == self._queued_task:
            return
        self._queued_task = task
        torch.autograd.Variable._execution_engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        # Callbacks queued while the graph ran (DDP's all-reduce wait) are ahead of this one in the
        # engine's list; one queued now runs after all of them.
        torch.autograd.Variable._execution_engine.queue_callback(self._record)

    def _record(self) -> None:
        step = self._state.global_step if self._state is not None else None
        if self.probe is None or step == self._recorded_step:
            return  # a second backward in one optimizer step: the first recording stands
        self._keep(self.probe.step())
        self._recorded_step = step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.probe is None or self._recorded_step == state.global_step:
            return
        # No backward reached the hooks (e.g. no parameter got a gradient through autograd): record
        # here so that steps stay one per optimizer step; these gradients are clipped if clipping is on.
        if args.max_grad_norm and args.max_grad_norm > 0 and not self._warned_fallback:
            warnings.warn(
                "ProbeCallback: gradients were not seen during backward; recording after the "
                "Trainer's clipping (max_grad_norm > 0), so norms are post-clip",
                stacklevel=2,
            )
            self._warned_fallback = True
        self._keep(self.probe.step())
        self._recorded_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self._queued_task = None

    # ---- logging ------------------------------------------------------------------------

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_summaries or logs is None or not self._last_rows:
            return
        if any(k.startswith("eval_") for k in logs) or not self._window:
            return
        values = self._window.take()
        logs.update(values)
        # The Trainer appended a copy of `logs` to log_history before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, **kwargs):
        self._teardown()
