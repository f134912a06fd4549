"""Where a run went wrong: gradient excursions, which block started them, and which followed.

A recorded value is an *excursion* when it exceeds K times the median of the same series over
its trailing WINDOW recorded steps (at least MIN_HISTORY of them), or is NaN/inf. The series are
the whole-block parameter-gradient norms and update ratios ||Δθ||/||θ|| (when recorded), one per
(metric, stack, stream, block): a gradient spike shows in the first, a block whose update blew up
(a learning rate too large for it, a bad Adam step) in the second. Excursions are grouped
into *events*: an event starts at an excursion while no event is open and takes every later
excursion of another block until all its blocks are back (each series that went out has since
recorded a value that is not an excursion, at a step before the current one); an excursion after
that starts a new event, with its own origin, step and size. So a spike that carries over to the
next step's gradients of other blocks stays one event, and a second spike after the first has
settled is a second event. An event names

- its step and origin: the block whose excursion came first; among blocks that went out on the
  same step, the one furthest above its median (the ratio), with the sublayer (attention, FFN,
  ...) whose own gradient norm rose most at that step;
- how large it was (value, trailing median, ratio);
- the blocks that followed, each at its first excursion step.

The median over a trailing window is robust to the excursion itself and to slow drifts (a
gradient that shrinks tenfold over training is not an event); K = 5 and WINDOW = 20 are stated
defaults, overridable. `Monitor` runs online, one recorded step at a time (the callbacks, the
`train` job); `find_events` runs it over the rows of a finished or live sink (`plot`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

from .verdicts import stream_name

METRICS = ("param_grad_norm", "update_ratio")  # the per-block series searched for excursions
K = 5.0  # an excursion: above K x the trailing median
WINDOW = 20  # trailing recorded steps the median is taken over
MIN_HISTORY = 5  # recorded steps a series needs before it can have an excursion


@dataclass
class Event:
    step: int
    metric: str  # the series the origin went out in (param_grad_norm or update_ratio)
    stack: str
    stream: str
    layer: int
    sublayer: (
        str  # the origin block's sublayer whose gradient rose most ("block" when none is recorded)
    )
    value: float
    median: float
    ratio: float  # value / median (inf for a non-finite value)
    followers: list[dict] = field(
        default_factory=list
    )  # {metric, stack, stream, layer, step, ratio}, in order

    def describe(self) -> str:
        where = stream_name(self.stack, self.stream)
        part = "" if self.sublayer == "block" else f" ({self.sublayer})"
        what = "gradient norm" if self.metric == "param_grad_norm" else "update ratio"
        size = (
            f"{what} {self.value:.3g}, {self.ratio:.3g}x its trailing median {self.median:.3g}"
            if math.isfinite(self.value)
            else f"{what} {self.value} (trailing median {self.median:.3g})"
        )
        text = f"step {self.step}: {where} block {self.layer}{part} first: {size}"
        if self.followers:
            shown = ", ".join(
                f"block {f['layer']} at step {f['step']} ({f['ratio']:.3g}x)"
                for f in self.followers[:6]
            )
            more = f" and {len(self.followers) - 6} more" if len(self.followers) > 6 else ""
            text += f"; then {shown}{more}"
        return text

    def to_row(self) -> dict:
        return asdict(self)


class Monitor:
    """Online excursion detector over recorded steps (see the module doc)."""

    def __init__(self, k: float = K, window: int = WINDOW, min_history: int = MIN_HISTORY):
        if not (k > 1 and window >= min_history >= 2):
            raise ValueError(
                f"instability rule: need k > 1 and window >= min_history >= 2, got {k}, {window}, {min_history}"
            )
        self.k, self.window, self.min_history = k, window, min_history
        self._history: dict[tuple, deque] = {}
        self.events: list[Event] = []
        self._open: Event | None = None
        self._open_seen: set[tuple] = set()  # the open event's blocks (stack, stream, layer)
        self._last_out: dict[tuple, int] = {}  # per block series: the last step it went out
        self._last_in: dict[tuple, int] = {}  # ... and the last step it was not out

    def _excursion(self, key: tuple, value: float) -> tuple[bool, float]:
        hist = self._history.setdefault(key, deque(maxlen=self.window))
        med = _median(hist) if len(hist) >= self.min_history else math.nan
        out = len(hist) >= self.min_history and (not math.isfinite(value) or value > self.k * med)
        if math.isfinite(value):
            hist.append(value)
        return out, med

    def update(self, rows: Iterable[Mapping]) -> list[Event]:
        """Feed the rows one `probe.step()` returned; returns the events that started in them.

        Rows are taken step by step in step order (a probe step's update ratios arrive with the
        next step's rows)."""
        by_step: dict[int, list] = {}
        for r in rows:
            if r["metric"] in METRICS:
                by_step.setdefault(int(r["step"]), []).append(r)
        started = []
        for step in sorted(by_step):
            started += self._step(step, by_step[step])
        return started

    def _settled(self, step: int) -> bool:
        """Whether every block of the open event is back before `step`: each of its series that went
        out has since recorded a value that is not an excursion."""
        for block in self._open_seen:
            for metric in METRICS:
                out = self._last_out.get((metric, *block))
                back = self._last_in.get((metric, *block), -1)
                if out is not None and not (out < back < step):
                    return False
        return True

    def _step(self, step: int, rows: list) -> list[Event]:
        if self._open is not None and self._settled(step):
            self._open = None  # the event is over: the next excursion starts a new one
        blocks, subs = [], {}
        for r in rows:
            key = (r["metric"], r["stack"], r["stream"], int(r["layer"]))
            v = float(r["value"])
            if r["sublayer"] == "block":
                out, med = self._excursion(key, v)
                (self._last_out if out else self._last_in)[key] = step
                if out:
                    blocks.append(
                        (key, v, med, v / med if math.isfinite(v) and med > 0 else math.inf)
                    )
            elif not r["sublayer"].startswith("group:"):
                _, med = self._excursion(key + (r["sublayer"],), v)
                subs.setdefault(key, []).append(
                    (v / med if med > 0 and math.isfinite(v) else math.inf, r["sublayer"])
                )
        started = []
        blocks.sort(key=lambda b: -b[3])
        for key, v, med, ratio in blocks:
            block = key[1:]  # the same block out in both series counts once
            if self._open is None:
                sub = max(
                    subs.get(key, []),
                    key=lambda s: s[0] if not math.isnan(s[0]) else -1,
                    default=(0, "block"),
                )
                self._open = Event(step, key[0], key[1], key[2], key[3], sub[1], v, med, ratio)
                self._open_seen = {block}
                self.events.append(self._open)
                started.append(self._open)
            elif block not in self._open_seen:
                self._open_seen.add(block)
                self._open.followers.append(
                    dict(
                        metric=key[0],
                        stack=key[1],
                        stream=key[2],
                        layer=key[3],
                        step=step,
                        ratio=ratio,
                    )
                )
        return started


def _median(values) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def find_events(
    rows: Iterable[Mapping], k: float = K, window: int = WINDOW, min_history: int = MIN_HISTORY
) -> list[Event]:
    """The instability events in a run's rows (any order), by the rule of the module doc."""
    monitor = Monitor(k, window, min_history)
    monitor.update(rows)
    return monitor.events
