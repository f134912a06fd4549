"""One registry of checkpoint formats; `load_any(path)` asks each, in order, whether the file is its own.

A format is one module that calls `register(name, order, claims)` on its load function, as the
placements register themselves: adding a format adds a module (and its import in
`checkpoints/__init__.py`), never a branch here. Formats are told apart by content, not file
name. `claims(source)` must be cheap and never raise for a file of another format; `Source`
unpickles a pickle at most once (safely) and shares it between the formats that look inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError
from .loaded import LoadedModel

BARE_FIELDS = (
    "placement",
    "depth",
    "decoder_depth",
    "d_model",
    "heads",
    "ffn",
    "vocab_size",
    "arch",
    "norm",
    "max_len",
    "position_offset",
    "alpha",
)
_UNREAD = object()


@dataclass
class Source:
    """A checkpoint path and the options of this load; `pickle()` is the file unpickled once."""

    path: Path
    trust_pickle: bool = False
    allow_missing: bool = False
    allow_unused: bool = (
        False  # stored weights of blocks the config omits (a truncated model) accepted
    )
    given: dict[str, Any] = field(default_factory=dict)  # BARE_FIELDS the user gave (not None)
    _obj: Any = field(default=_UNREAD, repr=False)

    def pickle(self) -> Any:
        if self._obj is _UNREAD:
            from .safe_pickle import load_pickle

            self._obj = load_pickle(self.path, trust=self.trust_pickle)
        return self._obj

    def no_bare_flags(self, what: str) -> None:
        if self.given:
            names = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(self.given))
            raise CheckpointError(
                f"{self.path}: {names} only apply to bare state dicts; this is {what}"
            )


@dataclass(frozen=True)
class Format:
    name: str
    order: int  # asked in increasing order; the catch-all (a pickled state dict) last
    claims: Callable[[Source], bool]
    load: Callable[[Source], LoadedModel]


FORMATS: dict[str, Format] = {}


def register(name: str, order: int, claims: Callable[[Source], bool]):
    """Decorator: `@register("fairseq", 40, is_fairseq_source)` on `load(source) -> LoadedModel`."""

    def wrap(load: Callable[[Source], LoadedModel]) -> Callable[[Source], LoadedModel]:
        if name in FORMATS:
            raise ValueError(f"checkpoint format {name!r} registered twice")
        FORMATS[name] = Format(name, order, claims, load)
        return load

    return wrap


def load_any(
    path: str | Path,
    trust_pickle: bool = False,
    allow_missing: bool = False,
    allow_unused: bool = False,
    **given: Any,
) -> LoadedModel:
    """Load any registered checkpoint format; `given` holds BARE_FIELDS for bare state dicts (None: not given).

    A weight that the files do not hold, even after resolving tied and aliased names, is an error
    unless `allow_missing`: then it keeps its random initialization and `missing_weights` names it.
    """
    unknown = sorted(set(given) - set(BARE_FIELDS))
    if unknown:
        raise TypeError(f"load_any: unknown options {unknown}")
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    source = Source(
        p,
        trust_pickle,
        allow_missing,
        allow_unused,
        {k: v for k, v in given.items() if v is not None},
    )
    for fmt in sorted(FORMATS.values(), key=lambda f: f.order):
        if fmt.claims(source):
            return fmt.load(source)
    if p.is_dir():
        raise CheckpointError(
            f"{p}: folder holds neither a residual-probe model nor a Hugging Face model "
            "(config.json with 'format' or 'model_type')"
        )
    raise CheckpointError(
        f"{p}: not a checkpoint format residual-probe reads ({', '.join(sorted(FORMATS))})"
    )


def labels_for(paths: tuple[str, ...]) -> list[str]:
    """Shortest path suffixes that tell the models apart: runs/pre-ln/model, runs/post-ln/model
    -> pre-ln/model, post-ln/model; the same path twice gets #i."""
    parts = [Path(p).resolve().parts for p in paths]
    for n in range(1, max(len(q) for q in parts) + 1):
        names = ["/".join(q[-n:]) for q in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{Path(p).name}#{i}" for i, p in enumerate(paths)]
