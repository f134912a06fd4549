"""The probe in a Lightning run: one line, `Trainer(callbacks=[ProbeCallback()])`.

    from residual_probe.integrations.lightning import ProbeCallback
    probe_cb = ProbeCallback(quantities=("param_grad_norm", "act_grad_norm", "forward_stats"))
    trainer = lightning.Trainer(max_steps=200, gradient_clip_val=1.0, callbacks=[probe_cb])
    trainer.fit(module, loader)
    rows = probe_cb.probe.rows()              # also in <log_dir>/probe.csv

- The probe is built on the LightningModule at `on_train_start` (its blocks are found inside it).
- It steps in `on_before_optimizer_step`, which Lightning calls once per optimizer step after
  gradient accumulation and AMP unscaling and before gradient clipping: the norms are of the
  accumulated, unscaled, unclipped gradient. Probe step s is the optimizer step that takes
  `trainer.global_step` from s to s + 1: the step Lightning's loggers write its metrics under
  (`global_step` inside the hook), so the probe's step and the logged step are one number.
- The summaries (`residual_probe.probe.scalars`) go through `pl_module.log_dict` on the steps the
  loggers write (`log_every_n_steps`): each key's value at the last recorded step, and under
  `probe_max/...` its largest value since the previous log (a spike between two logs shows).
- Under DDP the gradient is already averaged across ranks when the hook runs; forward and
  activation statistics are pooled across ranks by the probe. Every rank steps the probe (it is
  a collective); only global rank 0 writes the sink.
- Sink: `<trainer.log_dir or default_root_dir>/probe.csv` by default, with probe_run.json
  beside it (as the Hugging Face callback); `sink=None` for none.

Built for the `lightning` package (`import lightning`), not the older standalone
`pytorch_lightning`, whose Trainer accepts only its own Callback class.
"""

from __future__ import annotations

from . import require

require("lightning", "lightning", "residual_probe.integrations.lightning")

from lightning.pytorch import Callback  # noqa: E402

from ..probe import Probe  # noqa: E402
from .common import CallbackCore, sink_path  # noqa: E402


def _logs_now(trainer) -> bool:
    """Whether Lightning's loggers write this step's metrics (log_every_n_steps, or the run stops)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


class ProbeCallback(CallbackCore, Callback):
    """Records the probe once per optimizer step, before clipping; see the module doc.

    sink: "auto" (`<log_dir>/probe.csv`), a .csv/.jsonl path, or None.
    log_summaries: log the grouped `probe/...` scalars with `pl_module.log_dict`.
    forward_every: forward statistics on every n-th recorded step (`CallbackCore.probe_options`).
    **probe_kwargs: passed to `Probe` (quantities, every, steps, blocks, subsample_tokens, keep_rows, ...).
    """

    def on_train_start(self, trainer, pl_module) -> None:
        if self.probe is not None:
            self.probe.detach()
        self.sink_path = sink_path(
            self.sink, trainer.log_dir or trainer.default_root_dir, trainer.is_global_zero
        )
        sink = str(self.sink_path) if self.sink_path is not None else None
        kwargs = self.probe_options()
        if "group" not in kwargs:
            import torch.distributed as dist

            # The callback sees the LightningModule, not the strategy's DDP wrapper.
            if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
                kwargs["group"] = dist.group.WORLD
        self.probe = Probe(pl_module, sink=sink, start_step=trainer.global_step, **kwargs).attach()
        self.start_run_info(pl_module, "residual_probe.integrations.lightning.ProbeCallback")
        self._recorded_step = None
        self.reset()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.probe is None or self._recorded_step == trainer.global_step:
            return  # a second optimizer in the same step: one recording per step
        rows = self.probe.step()
        self._recorded_step = trainer.global_step
        self._keep(rows)
        if self.log_summaries and self._window and _logs_now(trainer):
            pl_module.log_dict(
                self._window.take(), on_step=True, on_epoch=False, prog_bar=False, logger=True
            )

    def on_train_end(self, trainer, pl_module) -> None:
        self.close_run_info()
        if self.probe is not None:
            self.probe.detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close_run_info()
        if self.probe is not None:
            self.probe.detach()  # hooks off and the sink closed; rows written so far stay on disk
