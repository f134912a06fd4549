"""Which quantities the probe computes at which step (Cockpit-style plain schedules).

A schedule is a callable step -> bool. `every=n` means steps 0, n, 2n, ...; `steps=[...]` an
explicit list. Quantities may share one schedule or each carry its own:
`quantities={"param_grad_norm": 1, "forward_stats": [0, 100, 1000]}`.
A quantity not scheduled on a step costs nothing on it (its hooks return at once).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Union

from .errors import ProbeError

ScheduleSpec = Union[int, Iterable[int], Callable[[int], bool]]


def make_schedule(
    every: ScheduleSpec | None = 1, steps: Iterable[int] | None = None
) -> Callable[[int], bool]:
    """A step -> bool schedule from `every` (int or callable) or `steps` (explicit list)."""
    if steps is not None:
        try:
            wanted = frozenset(int(s) for s in steps)
        except (TypeError, ValueError):
            raise ProbeError(f"steps: expected a list of integers, got {steps!r}") from None
        if any(s < 0 for s in wanted):
            raise ProbeError("steps: step numbers must be >= 0")
        return wanted.__contains__
    if callable(every):
        return every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ProbeError(f"every: expected a positive integer, got {every!r}")
    n = every
    return lambda step: step % n == 0


FORWARD_EVERY = 10
"""The integrations and `train` take the forward statistics (quantities marked `sparse`) on every
10th recorded step of the gradient norms, and on the first and last: a forward-statistics step
costs several kernels per block (1.5x a plain step on a GPU at small sizes, where launches
dominate), the gradient norms a few per model (about 1.04x); collapse moves slowly, a gradient
spike does not."""


def periodic(
    quantities: Iterable[str] | Mapping[str, ScheduleSpec],
    every: ScheduleSpec | None,
    steps: Iterable[int] | None,
) -> bool:
    """True when the quantities share one integer period `every` (no mapping, no `steps=`, no
    callable): the only schedule that `forward_every` thins."""
    return (
        steps is None
        and isinstance(every, int)
        and not isinstance(every, bool)
        and not isinstance(quantities, Mapping)
    )


def sparse_forward(
    quantities: Iterable[str],
    every: int,
    start: int,
    forward_every: int,
    sparse: Iterable[str],
    last: int | None = None,
) -> dict[str, Callable[[int], bool]]:
    """Schedules: every quantity on `every`; those in `sparse` only on every `forward_every`-th
    multiple of `every`, on the first recorded step at or after `start`, and on `last`."""
    if isinstance(forward_every, bool) or not isinstance(forward_every, int) or forward_every < 1:
        raise ProbeError(f"forward_every: expected a positive integer, got {forward_every!r}")
    base = make_schedule(every)
    first, period, sparse = -(-start // every) * every, every * forward_every, frozenset(sparse)

    def rare(step: int) -> bool:
        return base(step) and (step % period == 0 or step == first or step == last)

    return {q: rare if q in sparse else base for q in quantities}


class Schedule:
    """Per-quantity schedules; `active(step)` is the set of quantities to compute on `step`."""

    def __init__(
        self,
        quantities: Iterable[str] | Mapping[str, ScheduleSpec],
        every: ScheduleSpec | None = 1,
        steps: Iterable[int] | None = None,
        known: Iterable[str] = (),
        sparse: Iterable[str] = (),
        forward_every: int = 1,
        start: int = 0,
        last: int | None = None,
    ):
        """known: the quantity names that exist (the registry's); any other name is refused.
        sparse, forward_every, start, last: with forward_every > 1, the quantities named in `sparse`
        are thinned as `sparse_forward` says (only for a shared integer `every`)."""
        known = tuple(known)
        if isinstance(quantities, str):
            quantities = (quantities,)
        if forward_every != 1:
            if not periodic(quantities, every, steps):
                raise ProbeError(
                    "forward_every: only with quantities sharing an integer `every` "
                    "(not a mapping, steps= or a callable)"
                )
            quantities = sparse_forward(quantities, every, start, forward_every, sparse, last)
        if isinstance(quantities, Mapping):
            items = [(q, self._spec(spec)) for q, spec in quantities.items()]
        else:
            shared = make_schedule(every, steps)
            items = [(q, shared) for q in quantities]
        unknown = [q for q, _ in items if q not in known]
        if unknown:
            raise ProbeError(f"unknown quantity {unknown[0]!r}; choose from {', '.join(known)}")
        if not items:
            raise ProbeError("quantities: choose at least one of " + ", ".join(known))
        self.rules = dict(items)

    @staticmethod
    def _spec(spec: ScheduleSpec) -> Callable[[int], bool]:
        if isinstance(spec, int) or callable(spec):
            return make_schedule(spec)
        return make_schedule(steps=spec)

    @property
    def quantities(self) -> frozenset[str]:
        return frozenset(self.rules)

    def active(self, step: int) -> frozenset[str]:
        return frozenset(q for q, rule in self.rules.items() if rule(step))
