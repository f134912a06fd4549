"""A probe step in a few grouped scalars, for any logger (TensorBoard, W&B, the HF Trainer's logs).

    summary(probe.rows(), step=None) -> {"probe/grad_norm/decoder/00": 0.31, ...}

Keys (one group per quantity, then the stack, then the block; a stack's second stream, e.g.
ResiDual's dual stream d, is named `<stack>:<stream>`):

- `probe/grad_norm/<stack>/<kk>`       whole-block parameter gradient norm ||dL/dtheta_k||
- `probe/first_over_last/<stack>`      block 0's gradient norm over the last block's (< 1: vanishing)
- `probe/decay_rate/<stack>`           fitted per-block factor toward the input (geometric fit; < 1 vanishing)
- `probe/w2_grad_norm/<stack>`         the last block's FFN output weight gradient (Xiong's Theorem 1)
- `probe/act_grad_first_over_last/<stack>`  the same ratio for the activation gradient ||dL/dh_k||
- `probe/block_influence/<stack>/<kk>` 1 - cos(h_{k-1}, h_k) (ShortGPT)
- `probe/late_cos_adjacent/<stack>`    mean adjacent cosine over the last third of the blocks (collapse)
- `probe/attn_logit_max/<stack>/<kk>`  the block's largest attention logit (attn_logits)
- `probe/attn_entropy/<stack>/<kk>`    its mean attention entropy over heads and queries, nats
- `probe/attn_entropy_min/<stack>/<kk>` its smallest head's mean attention entropy, nats
- `probe/logit_z_mean`, `probe/logit_z_max`, `probe/logit_max`: log Z of the output logits, mean
                                       and largest over tokens, and the largest logit (output_logits)
- `probe/grad_norm_model/<part>`       the parts outside the blocks (embedding, embedding_norm,
                                       final_norm, head, other) and `total`, clip_grad_norm_'s norm
- `probe/nonfinite_count`              NaN/inf values recorded in the step
- `probe/instability_events`, `probe/instability_last_block`: with `InstabilityLog`, the count of
  instability events so far and the last one's origin block (`analysis.instability`)
- `probe/precursors`: with `InstabilityLog`, the count of precursor warnings so far (attention-logit
  growth, entropy collapse, log Z drift: `analysis.precursors`)

`kk` is the block index, zero-padded so that keys sort in block order. For a 12-block model
that is 12 + 12 + about 6 keys per stack: per-block curves for the two quantities that answer
the two questions (vanishing, collapse), one number for the rest. A value that cannot be
computed (a NaN norm, too few blocks) is NaN, never an exception: logging must not stop training.
Pure function of the rows: no torch, no I/O.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

PREFIX = "probe"


def stack_label(stack: str, stream: str) -> str:
    """The stack's name in keys: the stack, or `<stack>:<stream>` for a second residual stream."""
    return stack if stream in ("x", "-", "") else f"{stack}:{stream}"


def _ratio_and_rate(values: list[float]) -> tuple[float, float]:
    """(first/last, fitted per-block rate) of per-block norms in block order; NaN where undefined."""
    from ..analysis.fits import FitError, geometric_decay

    if len(values) < 2:
        return math.nan, math.nan
    try:
        fit = geometric_decay(values, n_boot=0)
    except FitError:  # a NaN, inf or zero norm: the ratio is not defined, say so with NaN
        return math.nan, math.nan
    return fit.first_over_last, fit.rate


def _series(
    rows: Iterable[Mapping], metric: str, sublayer: str | None = "block"
) -> dict[str, dict[int, float]]:
    """{stack label: {layer: value}} of one metric."""
    from ..analysis.rows import by_layer

    picked = (
        r for r in rows if r["metric"] == metric and (sublayer is None or r["sublayer"] == sublayer)
    )
    return {stack_label(*key): v for key, v in by_layer(picked).items()}


def _width(layers) -> int:
    return max(2, len(str(max(layers))))


def _per_block(group: str, label: str, by_layer: dict[int, float]) -> dict[str, float]:
    """`probe/<group>/<stack label>/<kk>` for each block, kk zero-padded to sort in block order."""
    w = _width(by_layer)
    return {f"{PREFIX}/{group}/{label}/{k:0{w}d}": by_layer[k] for k in sorted(by_layer)}


def summary(rows: Iterable[Mapping], step: int | None = None) -> dict[str, float]:
    """Grouped scalars of one recorded step: `step`, or the last step present in `rows`.

    rows: the probe's rows (dicts with step, stack, layer, sublayer, stream, metric, value), e.g.
    `probe.rows()`, `probe.step()`'s return value, or a sink read back. Returns {} when no row
    belongs to the step.
    """
    rows = list(rows)
    if not rows:
        return {}
    if step is None:
        step = max(int(r["step"]) for r in rows)
    rows = [r for r in rows if int(r["step"]) == step]
    out: dict[str, float] = {}

    for label, by_layer in _series(rows, "param_grad_norm").items():
        layers = sorted(by_layer)
        out.update(_per_block("grad_norm", label, by_layer))
        ratio, rate = _ratio_and_rate([by_layer[k] for k in layers])
        out[f"{PREFIX}/first_over_last/{label}"] = ratio
        out[f"{PREFIX}/decay_rate/{label}"] = rate
    for label, by_layer in _series(rows, "w2_grad_norm", sublayer=None).items():
        out[f"{PREFIX}/w2_grad_norm/{label}"] = by_layer[max(by_layer)]
    for label, by_layer in _series(rows, "act_grad_norm").items():
        out[f"{PREFIX}/act_grad_first_over_last/{label}"] = _ratio_and_rate(
            [by_layer[k] for k in sorted(by_layer)]
        )[0]
    for metric in ("block_influence", "attn_logit_max", "attn_entropy", "attn_entropy_min"):
        for label, by_layer in _series(rows, metric).items():
            out.update(_per_block(metric, label, by_layer))
    from ..analysis.verdicts import late_cos

    for label, by_layer in _series(rows, "cos_adjacent").items():
        out[f"{PREFIX}/late_cos_adjacent/{label}"] = late_cos(
            [by_layer[k] for k in sorted(by_layer)]
        )
    for r in rows:
        if r["metric"] == "param_grad_norm" and r["stack"] == "model":
            out[f"{PREFIX}/grad_norm_model/{r['sublayer']}"] = float(r["value"])
        if r["metric"] in ("logit_z_mean", "logit_z_max", "logit_max") and r["stack"] == "model":
            out[f"{PREFIX}/{r['metric']}"] = float(r["value"])
    nonfinite = [float(r["value"]) for r in rows if r["metric"] == "nonfinite_count"]
    if nonfinite:
        out[f"{PREFIX}/nonfinite_count"] = sum(nonfinite)
    return out


class SummaryWindow:
    """The summaries of every recorded step since the last `take()`, for loggers that write only
    every n-th step: `take()` gives each key's last value and, under `probe_max/...`, its largest
    finite value over the window, so a spike between two logs still shows.

        window.add(summary(rows))      # every recorded step
        logs.update(window.take())     # at a log
    """

    def __init__(self):
        self._last: dict[str, float] = {}
        self._max: dict[str, float] = {}

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self._last[key] = value
            if math.isfinite(value) and not value <= self._max.get(key, -math.inf):
                self._max[key] = value

    def __bool__(self) -> bool:
        return bool(self._last)

    def take(self) -> dict[str, float]:
        """{key: last value} plus {probe_max/<rest of key>: max}; empties the window."""
        out = dict(self._last)
        out.update(
            {f"{PREFIX}_max/{key[len(PREFIX) + 1 :]}": value for key, value in self._max.items()}
        )
        self._last, self._max = {}, {}
        return out


class InstabilityLog:
    """Instability events (`analysis.instability.Monitor`) and the precursor warnings before them
    (`analysis.precursors.PrecursorMonitor`) over a run, as summary keys for loggers:
    `probe/instability_events` (count so far), `probe/instability_last_block` (the last event's
    origin block; -1 before the first) and `probe/precursors` (count so far)."""

    def __init__(self):
        from ..analysis.instability import Monitor
        from ..analysis.precursors import PrecursorMonitor

        self.monitor = Monitor()
        self.precursors = PrecursorMonitor()

    def update(self, rows) -> list:
        """Feed the rows of one `probe.step()`; returns the events that started in them (the
        precursors that started are in `precursors.precursors`' tail)."""
        rows = list(rows)
        self.precursors.update(rows)
        return self.monitor.update(rows)

    def values(self) -> dict[str, float]:
        events = self.monitor.events
        return {
            f"{PREFIX}/instability_events": float(len(events)),
            f"{PREFIX}/instability_last_block": float(events[-1].layer) if events else -1.0,
            f"{PREFIX}/precursors": float(len(self.precursors.precursors)),
        }
