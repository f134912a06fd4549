"""The probe in a Lightning run: one line, `Trainer(callbacks=[ProbeCallback()])`.

    from residual_probe.integrations.lightning import ProbeCallback
    probe_cb = ProbeCallback(quantities=("param_grad_norm", "act_grad_norm", "forward_stats"))
    trainer = lightning.Trainer(max_steps=200, gradient_clip_val=1.0, callbacks=[probe_cb])
    trainer.fit(module, loader)
    rows = probe_cb.probe.rows()              # also in <log_dir>/probe.jsonl

- The probe is built on the LightningModule at `on_train_start` (its blocks are found inside it).
- It steps in `on_before_optimizer_step`, which Lightning calls once per optimizer step after
  gradient accumulation and AMP unscaling and before gradient clipping: the norms are of the
  accumulated, unscaled, unclipped gradient. Probe step s is the optimizer step that takes
  `trainer.global_step` from s to s + 1.
- The summaries (`residual_probe.probe.summary`) go through `pl_module.log_dict` on every step;
  the loggers write them at `log_every_n_steps`.
- Under DDP the gradient is already averaged across ranks when the hook runs; forward and
  activation statistics are pooled across ranks by the probe. Every rank steps the probe (it is
  a collective); only global rank 0 writes the sink.
- Sink: `<trainer.log_dir or default_root_dir>/probe.jsonl` by default; `sink=None` for none.

Built for the `lightning` package (`import lightning`), not the older standalone
`pytorch_lightning`, whose Trainer accepts only its own Callback class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import require

require("lightning", "lightning", "residual_probe.integrations.lightning")

from lightning.pytorch import Callback  # noqa: E402

from ..probe import Probe  # noqa: E402
from ..probe.summary import summary  # noqa: E402

AUTO = "auto"


class ProbeCallback(Callback):
    """Records the probe once per optimizer step, before clipping; see the module doc.

    sink: "auto" (`<log_dir>/probe.jsonl`), a .csv/.jsonl path, or None.
    log_summaries: log the grouped `probe/...` scalars with `pl_module.log_dict`.
    **probe_kwargs: passed to `Probe` (quantities, every, steps, blocks, subsample_tokens, keep_rows, ...).
    """

    def __init__(self, sink: str | os.PathLike | None = AUTO, log_summaries: bool = True, **probe_kwargs: Any):
        for key in ("model", "start_step", "sink"):
            if key in probe_kwargs:
                raise TypeError(f"ProbeCallback sets {key!r} itself")
        self.sink, self.log_summaries, self.probe_kwargs = sink, log_summaries, probe_kwargs
        self.probe: Probe | None = None
        self.sink_path: Path | None = None
        self._recorded_step: int | None = None
        self._last_rows: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if self.probe is not None:
            self.probe.detach()
        sink = self.sink
        if sink == AUTO:
            sink = None
            if trainer.is_global_zero:
                folder = trainer.log_dir or trainer.default_root_dir
                os.makedirs(folder, exist_ok=True)
                sink = os.path.join(folder, "probe.jsonl")
        elif sink is not None and "{rank}" not in str(sink) and not trainer.is_global_zero:
            sink = None  # one file, written by rank 0 (the probe's numbers are the same on every rank)
        self.sink_path = Path(sink) if sink is not None else None
        kwargs = dict(self.probe_kwargs)
        if "group" not in kwargs:
            import torch.distributed as dist

            # The callback sees the LightningModule, not the strategy's DDP wrapper.
            if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
                kwargs["group"] = dist.group.WORLD
        self.probe = Probe(pl_module, sink=sink, start_step=trainer.global_step, **kwargs).attach()
        self._recorded_step = None
        self._last_rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.probe is None or self._recorded_step == trainer.global_step:
            return  # a second optimizer in the same step: one recording per step
        rows = self.probe.step()
        self._recorded_step = trainer.global_step
        if rows:  # a step the probe's schedule skips returns no rows: the last recorded step stands
            self._last_rows = rows
        if self.log_summaries and rows:
            values = summary(rows)
            if values:
                pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, logger=True)

    def summary(self) -> dict[str, float]:
        """The grouped scalars of the last recorded step ({} before the first)."""
        return summary(self._last_rows)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.probe is not None:
            self.probe.detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.probe is not None:
            self.probe.detach()  # hooks off and the sink closed; rows written so far stay on disk
