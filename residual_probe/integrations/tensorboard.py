"""Probe summaries and per-layer profiles to TensorBoard, from any training loop.

    from torch.utils.tensorboard import SummaryWriter
    from residual_probe.integrations.tensorboard import ProbeWriter
    tb = ProbeWriter(SummaryWriter("runs/exp"))           # or ProbeWriter("runs/exp")
    with Probe(model, sink="runs/exp/probe.csv") as probe:
        for batch in data:
            loss.backward(); rows = probe.step(); opt.step(); ...
            tb.write(rows)

Each `write(rows)` (the rows of one probe step) adds, at that step:
- the grouped scalars of `residual_probe.probe.scalars` (`probe/grad_norm/<stack>/<kk>`,
  `probe/first_over_last/<stack>`, `probe/block_influence/<stack>/<kk>`, ...), and the counts of
  instability events and precursor warnings so far (`probe/instability_events`,
  `probe/precursors`: `InstabilityLog`);
- every `image_every` written steps, an image per stack `probe/grad_norm_heatmap/<stack>`: block
  (rows, block 0 at the bottom) x recorded step (columns), log10 of the gradient norm mapped to
  viridis over that image's own range (brightest = largest norm); NaN/inf are red.

Any writer with `add_scalar` and `add_image` works (torch's SummaryWriter, tensorboardX).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from ..probe.scalars import InstabilityLog, summary
from .common import GradHistory


def _writer(target: Any):
    if hasattr(target, "add_scalar"):
        return target
    from . import require

    require("tensorboard", "tensorboard", "residual_probe.integrations.tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.fspath(target))


class ProbeWriter:
    """Writes probe rows to TensorBoard; see the module doc.

    target: a SummaryWriter-like object or a log folder. image_every: heatmap every n-th written
    step (0: never). prefix: prepended to every tag (e.g. "train/").
    """

    def __init__(self, target: Any, image_every: int = 50, prefix: str = ""):
        if isinstance(image_every, bool) or not isinstance(image_every, int) or image_every < 0:
            raise ValueError(f"image_every: expected an integer >= 0, got {image_every!r}")
        self.writer = _writer(target)
        self.image_every, self.prefix = image_every, prefix
        self._history = GradHistory()
        self.instability = InstabilityLog()  # events and precursor warnings so far (their counts)
        self._written = 0

    def write(self, rows: Iterable[Mapping], step: int | None = None) -> dict[str, float]:
        """Add one probe step's summaries (and the heatmaps when due); returns the scalars written."""
        rows = list(rows)
        if not rows:
            return {}
        step = max(int(r["step"]) for r in rows) if step is None else step
        self.instability.update(rows)
        values = {**summary(rows, max(int(r["step"]) for r in rows)), **self.instability.values()}
        for key, value in values.items():
            self.writer.add_scalar(self.prefix + key, value, step)
        self._history.add(rows, step)
        self._written += 1
        if self.image_every and (self._written - 1) % self.image_every == 0:
            self.write_heatmaps(step)
        return values

    def write_heatmaps(self, step: int) -> None:
        """One block x step image per stack of all gradient norms written so far."""
        for label, (img, _, _) in self._history.heatmaps().items():
            self.writer.add_image(
                f"{self.prefix}probe/grad_norm_heatmap/{label}", img, step, dataformats="CHW"
            )

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
