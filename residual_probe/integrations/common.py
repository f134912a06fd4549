"""What the Hugging Face and Lightning callbacks share: where the sink goes, and the run's
metadata beside it (probe_run.json), which `residual-probe plot` reads for the placement."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..probe.schedule import FORWARD_EVERY

AUTO = "auto"


def sink_path(sink, folder: str | os.PathLike, is_zero: bool) -> Path | None:
    """The sink a callback writes: "auto" is <folder>/probe.csv on process 0; a path without
    "{rank}" is written by process 0 only (the probe's numbers are the same on every rank)."""
    if sink == AUTO:
        if not is_zero:
            return None
        os.makedirs(folder, exist_ok=True)
        return Path(folder) / "probe.csv"
    if sink is not None and "{rank}" not in str(sink) and not is_zero:
        return None
    return Path(sink) if sink is not None else None


def declared_placement(model) -> str | None:
    """The placement a residual-probe model declares in its config (`cfg.placement`), also inside a
    LightningModule that wraps it; None for other models."""
    for m in (model, *model.children()):
        config = getattr(m, "config", None) or getattr(m, "cfg", None)
        if isinstance(getattr(config, "placement", None), str):
            return config.placement
    return None


class RunInfo:
    """probe_run.json beside the sink, written after the first recorded step: the writer, the
    model's class and type, its placement and the blocks probed. The placement is the model's
    declared one (a residual-probe config) or what `probe.structure` reads from its blocks during
    that step's forward (Gemma 2: sandwich), never a table of model types."""

    def __init__(self, path: Path, model, probe, writer: str):
        from ..probe.structure import StructureWatch

        self.path, self.model, self.probe, self.writer = path, model, probe, writer
        self.declared = declared_placement(model)
        self.watch = None if self.declared else StructureWatch(probe.blocks, model)

    def write(self) -> None:
        from ..output import write_json

        reason = None
        if self.watch is not None:
            found = self.watch.result()
            placement, source = found["placement"], "detected from the block structure"
            reason = found["reason"]
        else:
            placement, source = self.declared, "the model's config"
        config = getattr(self.model, "config", None) or getattr(self.model, "cfg", None)
        info = {
            "writer": self.writer,
            "model_class": type(self.model).__name__,
            "model_type": getattr(config, "model_type", None),
            "placement": placement,
            "placement_source": source,
            "placement_reason": reason,  # why "other", else None
            "blocks": [b.name for b in self.probe.blocks],
        }
        write_json(self.path.with_name("probe_run.json"), info)

    def close(self) -> None:
        """Stop watching (a run that ends before its first recorded step writes no run info)."""
        if self.watch is not None:
            self.watch.remove()


NAN_RGB = (214, 39, 40)  # NaN/inf cells of the heatmaps (TensorBoard, W&B)


def heatmap_rgb(matrix: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(3, layers, steps) uint8 image of log10(matrix) in viridis, block 0 at the bottom; NaN/inf/<=0 red.

    Returns the image and the (low, high) of log10 that the colours span.
    """
    from matplotlib import colormaps

    m = np.asarray(matrix, dtype=float)
    ok = np.isfinite(m) & (m > 0)
    logs = np.where(ok, np.log10(np.where(ok, m, 1.0)), np.nan)
    lo, hi = (float(np.nanmin(logs)), float(np.nanmax(logs))) if ok.any() else (0.0, 1.0)
    scaled = (logs - lo) / (hi - lo) if hi > lo else np.full_like(logs, 0.5)
    rgb = (colormaps["viridis"](np.nan_to_num(scaled))[..., :3] * 255).astype(np.uint8)
    rgb[~ok] = NAN_RGB
    return np.ascontiguousarray(rgb[::-1].transpose(2, 0, 1)), lo, hi


class GradHistory:
    """Whole-block gradient norms of every written step, per stack, for the block x step heatmaps
    the TensorBoard and W&B writers log (`heatmaps()` -> {stack label: (image, steps, log10 range)})."""

    def __init__(self):
        self._by_stack: dict[str, dict[int, dict[int, float]]] = {}

    def add(self, rows, step: int) -> None:
        from ..probe.scalars import stack_label

        for r in rows:
            if r["metric"] == "param_grad_norm" and r["sublayer"] == "block":
                label = stack_label(r["stack"], r["stream"])
                self._by_stack.setdefault(label, {}).setdefault(step, {})[int(r["layer"])] = float(
                    r["value"]
                )

    def heatmaps(self) -> dict[str, tuple]:
        import math

        out = {}
        for label, by_step in self._by_stack.items():
            steps = sorted(by_step)
            layers = sorted({k for v in by_step.values() for k in v})
            img, lo, hi = heatmap_rgb(
                np.array([[by_step[s].get(k, math.nan) for s in steps] for k in layers])
            )
            out[label] = (img, steps, (lo, hi))
        return out


class CallbackCore:
    """The state and logging the Hugging Face and Lightning callbacks share: options, the probe,
    the last recorded rows, the summary window between logs and the instability events."""

    def __init__(
        self,
        sink: str | os.PathLike | None = AUTO,
        log_summaries: bool = True,
        forward_every: int = FORWARD_EVERY,
        **probe_kwargs: Any,
    ):
        for key in ("model", "start_step", "sink"):
            if key in probe_kwargs:
                raise TypeError(f"ProbeCallback sets {key!r} itself")
        self.sink, self.log_summaries, self.probe_kwargs = sink, log_summaries, probe_kwargs
        self.forward_every = forward_every
        self.probe = None
        self.sink_path: Path | None = None
        self._run_info: RunInfo | None = None
        self._recorded_step: int | None = None
        self.reset()

    def probe_options(self) -> dict:
        """The Probe's keyword arguments: the user's, with the forward statistics (forward_stats,
        subsample) on every `forward_every`-th recorded step and the first (default
        schedule.FORWARD_EVERY, 10; 1: every one), unless the user scheduled the quantities
        themselves (a mapping, `steps=` or a callable `every`)."""
        from ..probe.quantities import DEFAULT_QUANTITIES
        from ..probe.schedule import periodic

        kwargs = dict(self.probe_kwargs)
        quantities = kwargs.get("quantities", DEFAULT_QUANTITIES)
        if self.forward_every != 1 and periodic(
            quantities, kwargs.get("every", 1), kwargs.get("steps")
        ):
            kwargs["forward_every"] = self.forward_every
        return kwargs

    def reset(self) -> None:
        """A new run: forget the last rows, the window and the events."""
        from ..probe.scalars import InstabilityLog, SummaryWindow

        self._last_rows: list[dict] = []
        self._window = SummaryWindow()
        self.instability = InstabilityLog()

    def start_run_info(self, model, writer: str) -> None:
        """probe_run.json beside the sink (process 0), written at the first recorded step."""
        self.close_run_info()
        if self.sink_path is not None:
            self._run_info = RunInfo(self.sink_path, model, self.probe, writer)

    def close_run_info(self) -> None:
        if getattr(self, "_run_info", None) is not None:
            self._run_info.close()
        self._run_info = None

    def _keep(self, rows: list[dict]) -> None:
        """A probe step's rows: a step the schedule skips returns none, and the last recorded one stands."""
        from ..probe.scalars import summary

        if self._run_info is not None:  # the first step's forward has run: its blocks are known
            self._run_info.write()
            self._run_info = None
        if rows:
            self._last_rows = rows
            self.instability.update(rows)
            self._window.add({**summary(rows), **self.instability.values()})

    def summary(self) -> dict[str, float]:
        """The grouped scalars of the last recorded step ({} before the first)."""
        from ..probe.scalars import summary

        return summary(self._last_rows)
