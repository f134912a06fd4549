"""Probe summaries and per-layer heatmaps to a Weights & Biases run, from any training loop.

    import wandb
    from residual_probe.integrations.wandb import ProbeWandb
    run = wandb.init(project="my-model")
    wb = ProbeWandb(run)
    with Probe(model) as probe:
        for batch in data:
            loss.backward(); rows = probe.step(); opt.step(); ...
            wb.write(rows)

`write(rows)` logs the grouped scalars of `residual_probe.probe.scalars` (about 30 keys for a
12-block model, all under the `probe/` section), and every `image_every` written steps a
block x step heatmap image per stack (`probe/grad_norm_heatmap/<stack>`, log10 colour, NaN red).

Steps: by default the values are logged at the probe's step (`run.log(..., step=s)`). If your
loop logs its own metrics with `wandb.log` at its own step, use `ProbeWandb(run,
use_probe_step=False)`: the values then join your next `wandb.log` call (`commit=False`).
Offline runs (`WANDB_MODE=offline`) work the same and need no network.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from ..probe.scalars import InstabilityLog, summary
from . import require
from .common import GradHistory


class ProbeWandb:
    """Writes probe rows to a W&B run; see the module doc. run: a `wandb.Run`, or None for `wandb.run`."""

    def __init__(
        self, run: Any = None, image_every: int = 0, prefix: str = "", use_probe_step: bool = True
    ):
        wandb = require("wandb", "wandb", "residual_probe.integrations.wandb")
        if isinstance(image_every, bool) or not isinstance(image_every, int) or image_every < 0:
            raise ValueError(f"image_every: expected an integer >= 0, got {image_every!r}")
        run = run if run is not None else wandb.run
        if run is None:
            raise ValueError("no W&B run: call wandb.init() first, or pass the run")
        self.run, self.image_every, self.prefix, self.use_probe_step = (
            run,
            image_every,
            prefix,
            use_probe_step,
        )
        self._wandb = wandb
        self._history = GradHistory()
        self.instability = InstabilityLog()  # events and precursor warnings so far (their counts)
        self._written = 0

    def write(self, rows: Iterable[Mapping]) -> dict[str, Any]:
        """Log one probe step's summaries (and heatmaps when due); returns what was logged."""
        rows = list(rows)
        if not rows:
            return {}
        step = max(int(r["step"]) for r in rows)
        self.instability.update(rows)
        values: dict[str, Any] = {
            self.prefix + k: v
            for k, v in {**summary(rows, step), **self.instability.values()}.items()
        }
        self._history.add(rows, step)
        self._written += 1
        if self.image_every and (self._written - 1) % self.image_every == 0:
            values.update(self.heatmaps())
        if self.use_probe_step:
            self.run.log(values, step=step)
        else:
            self.run.log(values, commit=False)
        return values

    def heatmaps(self) -> dict[str, Any]:
        """{tag: wandb.Image} of every gradient norm written so far, block x step per stack."""
        from PIL import Image

        out = {}
        for label, (img, steps, (lo, hi)) in self._history.heatmaps().items():
            caption = (
                f"block (rows, 0 at the bottom) x step {steps[0]}..{steps[-1]}; "
                f"log10 grad norm {lo:.2f}..{hi:.2f}; red: NaN/inf"
            )
            # a PIL image: W&B would read a (3, 1, 3) array as channels-first
            pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), mode="RGB")
            out[f"{self.prefix}probe/grad_norm_heatmap/{label}"] = self._wandb.Image(
                pil, caption=caption
            )
        return out
