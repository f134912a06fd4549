"""Bare state dicts (a torch pickle or a .safetensors file of tensors), rebuilt into our Transformer
from the weights' shapes plus the placement and head count the user gives (the weights cannot say
them). Names may be residual-probe's or fairseq's; a shared tensor stored once (the output
projection tied to the embedding) is resolved from the safetensors metadata or by its absence.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models import ConfigError, ModelConfig, Transformer
from .errors import CheckpointError
from .fairseq import PADDING_IDX
from .layout import from_fairseq, looks_fairseq, shapes
from .loaded import LoadedModel, missing_notes, ours
from .native import load_exact, resolve_aliases
from .registry import Source, register
from .safetensors_io import is_safetensors, load_file


def state_dict_of(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a bare checkpoint: itself, or its `model` / `state_dict` entry."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: not a state dict (expected a dict of tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{source}: not a state dict: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor"
        )
    return dict(obj)


def load_bare(
    state: dict[str, torch.Tensor], source: str, given: dict[str, Any], allow_missing: bool = False
) -> tuple[Transformer, list[str]]:
    """A reference model from bare weights: sizes read from shapes, checked against what the user gave.

    Returns (model in eval mode, names of weights left at initialization: empty unless allow_missing).
    """
    fairseq_names = looks_fairseq(state)
    if fairseq_names:
        state = from_fairseq(state)
    found = shapes(state)
    for key, value in found.items():
        if given.get(key) is not None and given[key] != value:
            raise CheckpointError(
                f"{source}: --{key.replace('_', '-')} {given[key]} but the weights have {value}"
            )
    for key in ("placement", "heads"):
        if given.get(key) is None:
            raise CheckpointError(
                f"{source}: a bare state dict does not record its {key}: pass --{key}"
            )
    fields = {**found, **{k: v for k, v in given.items() if v is not None}}
    if fairseq_names:
        fields.setdefault("position_offset", PADDING_IDX + 1)
    last = (
        "encoder" if found["arch"] == "encoder" else "decoder"
    )  # the output projection reads this stack
    proj, emb = (
        state.get("output_projection.weight"),
        state.get(f"{last}.embed.embed_tokens.weight"),
    )
    # Absent: stored once under the embedding's name (tied); present and equal: tied in the file.
    fields["tie_embeddings"] = proj is None or (
        emb is not None and proj.shape == emb.shape and torch.equal(proj, emb)
    )
    if fields["tie_embeddings"]:
        state.pop("output_projection.weight", None)
    fields.setdefault("max_len", 1024)
    try:
        cfg = ModelConfig(dropout=0.0, **fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    model = Transformer(cfg)
    missing = load_exact(model, {k: v.float() for k, v in state.items()}, source, allow_missing)
    return model.eval(), missing


def _bare(source: Source, state: dict[str, torch.Tensor]) -> LoadedModel:
    model, missing = load_bare(state, str(source.path), source.given, source.allow_missing)
    start = 2 if looks_fairseq(state) else 0  # fairseq's decoder starts with </s>
    return ours(
        model,
        "state-dict",
        str(source.path),
        missing_notes(missing),
        missing,
        decoder_start_id=start,
    )


# A file named .safetensors is read as one even when its header is wrong, so that a text file
# under that name is told "not a safetensors file" rather than a pickle opcode error.
@register(
    "state-dict (safetensors)",
    30,
    lambda s: (
        s.path.is_file() and (is_safetensors(s.path) or s.path.suffix.lower() == ".safetensors")
    ),
)
def load_safetensors_state(source: Source) -> LoadedModel:
    tensors, metadata = load_file(source.path)
    return _bare(source, resolve_aliases(tensors, metadata))


@register("state-dict (pickle)", 90, lambda s: s.path.is_file())
def load_pickled_state(source: Source) -> LoadedModel:
    return _bare(source, state_dict_of(source.pickle(), str(source.path)))
