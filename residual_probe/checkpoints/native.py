"""residual-probe's own format: a folder with config.json (the ModelConfig) and model.safetensors.

safetensors holds only tensors, so loading runs no code; the config is strict JSON, so a model
is rebuilt exactly (placement, sizes, init are all in it). Tied weights (the output projection
shares the token embedding) are written once and re-tied by the rebuilt model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..models import ConfigError, ModelConfig, Transformer
from ..output import write_json
from .errors import CheckpointError
from .loaded import LoadedModel, first_names, missing_notes, ours
from .registry import Source, register
from .safetensors_io import load_file, save_file

FORMAT = "residual-probe"
FORMAT_VERSION = 1
CONFIG, WEIGHTS = "config.json", "model.safetensors"


def unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of a shared tensor (safetensors forbids aliases)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def save_model(model: Transformer, out_dir: str | Path) -> Path:
    """Write `model` to `out_dir` (created if needed); returns the folder."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    save_file(unique_state(model), d / WEIGHTS, metadata={"format": FORMAT})
    write_json(
        d / CONFIG,
        {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.cfg.to_dict()},
    )
    return d


def is_native(path: str | Path) -> bool:
    cfg = Path(path) / CONFIG
    try:
        return Path(path).is_dir() and json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_config(path: str | Path) -> ModelConfig:
    p = Path(path) / CONFIG
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {exc.strerror or exc}") from None
    except ValueError:
        raise CheckpointError(f"{p}: not valid JSON") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(data.get("model"), dict)
    ):
        raise CheckpointError(f"{p}: not a residual-probe model config")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: format version {data['format_version']} is newer than this residual-probe reads"
        )
    try:
        return ModelConfig.from_dict(data["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{p}: {exc}") from None


def load_model(path: str | Path, allow_missing: bool = False) -> Transformer:
    """Rebuild a model saved by `save_model`, in eval mode (`missing_weights` lists weights left at init)."""
    cfg = read_config(path)
    tensors, metadata = load_file(Path(path) / WEIGHTS)
    model = Transformer(cfg)
    model.missing_weights = load_exact(
        model, resolve_aliases(tensors, metadata), str(Path(path) / WEIGHTS), allow_missing
    )
    return model.eval()


@register("residual-probe", 10, lambda s: is_native(s.path))
def load_native(source: Source) -> LoadedModel:
    source.no_bare_flags("a folder")
    model = load_model(source.path, source.allow_missing)
    missing = model.missing_weights
    return ours(model, "residual-probe", str(source.path), missing_notes(missing), missing)


def load_exact(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str, allow_missing: bool = False
) -> list[str]:
    """Copy `tensors` into `model`, requiring every weight present once, with matching shapes.

    Aliased names (tied weights) may be absent: their other name carries the data. A weight the
    files lack is an error unless `allow_missing`: then it keeps its initialization, and the
    sorted list of such names is returned.
    """
    expected = model.state_dict()
    present = unique_state(model)
    missing = sorted(k for k in present if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    if (missing and not allow_missing) or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} weights ({first_names(missing)}; --allow-missing-weights measures them "
                "at random initialization)"
            )
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source}: weights do not fit the model: {'; '.join(parts)}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(t.shape)}, the model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(
        tensors, strict=False
    )  # checked above: only aliases (or allowed names) can be absent
    return missing


def resolve_aliases(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Add the names `safetensors.torch.save_model` dropped for shared tensors: its metadata maps each
    dropped name to the stored one ({"output_projection.weight": "decoder.embed.embed_tokens.weight"})."""
    out = dict(tensors)
    for dropped, kept in metadata.items():
        if dropped not in out and kept in tensors:
            out[dropped] = tensors[kept]
    return out
