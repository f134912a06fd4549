"""Tidy rows (dicts with stack, layer, stream, ..., value) grouped into per-block profiles."""

from __future__ import annotations

from typing import Iterable, Mapping


def by_layer(
    rows: Iterable[Mapping], keys: tuple[str, ...] = ("stack", "stream"), value: str = "value"
) -> dict[tuple, dict[int, float]]:
    """{(row[k] for k in keys): {layer: float(row[value])}} of rows already selected (one metric,
    one step); a later row of the same key and layer replaces an earlier one."""
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), {})[int(r["layer"])] = float(r[value])
    return out


def in_order(profile: Mapping[int, float]) -> list[float]:
    """A profile's values in block order."""
    return [profile[k] for k in sorted(profile)]
