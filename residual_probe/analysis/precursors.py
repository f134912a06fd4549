"""Warnings before a run breaks: attention logits that grow, attention entropy that collapses,
output log-partition that drifts.

The gradient-excursion events of `analysis.instability` fire when a run is already going wrong.
These fire on the quantities large-scale trainers watch *before* the loss shows it (Wortsman et
al. 2023, "Small-scale proxies for large-scale Transformer training instabilities", arXiv
2309.14322; Zhai et al. 2023, arXiv 2303.06296; Dehghani et al. 2023, ViT-22B). A value that
starts near zero has no meaningful "K x its median", so the rules are absolute or relative to
the run's own start:

- attention-logit growth: a block's largest attention logit `attn_logit_max` above
  ATTN_LOGIT_LIMIT (50: where Gemma 2 soft-caps its attention logits; Megatron clips at a max
  logit of 100, `qk_clip_threshold`, as Kimi K2's MuonClip does);
- attention-entropy collapse: a block's mean attention entropy `attn_entropy` below
  ENTROPY_SHARE of its value at the first recorded step (Zhai et al.'s entropy collapse: the
  softmax saturates to near one-hot);
- output-logit drift: the mean log-partition `logit_z_mean` (log Z = logsumexp of the output
  logits) more than LOGZ_DRIFT nats away from its first recorded value (Wortsman et al.'s output
  logit divergence; PaLM's z-loss keeps log Z near 0);
- a non-finite value in any of these series.

Each (series, block) warns once, at the first step its rule holds; the warning names the block
(and head, where rows carry one), the value, the rule, and what the field does about it. The
thresholds are the sources' where they state one; the entropy share and the log Z drift are ours,
and their lead time and false alarms are measured by the `instability` study.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

ATTN_LOGIT_LIMIT = 50.0  # Gemma 2's attention soft-cap; Megatron / MuonClip clip at 100
ENTROPY_SHARE = 0.3  # of the block's mean attention entropy at the first recorded step
LOGZ_DRIFT = 10.0  # nats of log Z away from its first recorded value

# series -> (what it warns of, what the field does about it)
RULES = {
    "attn_logit_max": (
        "attention-logit growth",
        "QK-norm (Dehghani et al. 2023, Wortsman et al. 2023), logit soft-capping (Gemma 2), "
        "a lower peak learning rate or a longer warm-up",
    ),
    "attn_entropy": (
        "attention-entropy collapse",
        "QK-norm, sigma-reparametrized attention (Zhai et al. 2023), a lower peak learning rate "
        "or a longer warm-up",
    ),
    "logit_z_mean": (
        "output-logit drift",
        "z-loss (PaLM, coefficient 1e-4; Wortsman et al. 2023), weight decay, a lower learning rate",
    ),
}
METRICS = tuple(RULES)
# the rows the rules read: a block's pooled attention rows and the output head's; the per-module
# rows of a block with several attention modules (sublayer self_attn / cross_attn) are left out,
# so each block warns once per series, from what all its attention modules see together
SUBLAYERS = ("block", "head")


@dataclass
class Precursor:
    step: int
    metric: str  # the series (one of METRICS)
    stack: str
    stream: str
    layer: int  # -1 for the whole model (logit_z_mean)
    head: str  # the head where the rows name one, else ""
    value: float
    reference: float  # the threshold crossed (absolute, or derived from the first value)
    start: float  # the series' first recorded value

    @property
    def warns_of(self) -> str:
        return RULES[self.metric][0]

    @property
    def remedy(self) -> str:
        return RULES[self.metric][1]

    def describe(self) -> str:
        where = "the output logits" if self.layer < 0 else f"{self.stack} block {self.layer}"
        if self.head:
            where += f" head {self.head}"
        if not math.isfinite(self.value):
            rule = f"{self.metric} is {self.value}"
        elif self.metric == "attn_logit_max":
            rule = f"largest attention logit {self.value:.3g} > {self.reference:g}"
        elif self.metric == "attn_entropy":
            rule = (
                f"mean attention entropy {self.value:.3g} nats < {ENTROPY_SHARE:g}x its start "
                f"{self.start:.3g}"
            )
        else:
            rule = (
                f"mean log Z {self.value:.3g} moved more than {LOGZ_DRIFT:g} nats from its "
                f"start {self.start:.3g}"
            )
        return f"step {self.step}: {self.warns_of} at {where}: {rule}; the field's remedy: {self.remedy}"

    def to_row(self) -> dict:
        return asdict(self)


def _crossed(metric: str, value: float, start: float) -> tuple[bool, float]:
    """Whether `value` breaks the series' rule, and the threshold it is held to."""
    if metric == "attn_logit_max":
        return value > ATTN_LOGIT_LIMIT, ATTN_LOGIT_LIMIT
    if metric == "attn_entropy":
        return value < ENTROPY_SHARE * start, ENTROPY_SHARE * start
    return abs(value - start) > LOGZ_DRIFT, start + math.copysign(LOGZ_DRIFT, value - start)


class PrecursorMonitor:
    """Online: feed each `probe.step()`'s rows; `precursors` holds every warning so far."""

    def __init__(self):
        self._start: dict[tuple, float] = {}
        self._fired: set[tuple] = set()
        self.precursors: list[Precursor] = []

    def update(self, rows: Iterable[Mapping]) -> list[Precursor]:
        """The warnings that start in these rows (taken in step order)."""
        mine = sorted(
            (r for r in rows if r["metric"] in RULES and r.get("sublayer", "block") in SUBLAYERS),
            key=lambda r: (int(r["step"]), r["stack"], int(r["layer"]), str(r.get("head", ""))),
        )
        new = []
        for r in mine:
            head = str(r.get("head", "") or "")
            key = (r["metric"], r["stack"], r["stream"], int(r["layer"]), head)
            value = float(r["value"])
            start = self._start.setdefault(key, value)
            if key in self._fired:
                continue
            out, reference = (
                _crossed(r["metric"], value, start) if math.isfinite(value) else (True, math.nan)
            )
            if out:
                self._fired.add(key)
                p = Precursor(
                    int(r["step"]), key[0], key[1], key[2], key[3], head, value, reference, start
                )
                self.precursors.append(p)
                new.append(p)
        return new


def find_precursors(rows: Iterable[Mapping]) -> list[Precursor]:
    """Every precursor warning in a run's rows (any order)."""
    monitor = PrecursorMonitor()
    monitor.update(rows)
    return monitor.precursors
