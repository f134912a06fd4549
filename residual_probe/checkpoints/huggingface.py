"""Hugging Face model folders (config.json + weights, sharded or not), loaded offline and safely.

transformers is an optional extra, imported here only. Before transformers sees the folder,
the files are checked (config is JSON, every listed shard exists, safetensors headers fit,
pickles call nothing blocked), so a bad folder gives one clear line. Loading itself is
transformers' own `from_pretrained` (it knows each family's key renames), with the offline
flags set, `local_files_only`, `weights_only` unpickling and no remote code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .safe_pickle import blocked_globals, checkpoint_globals, unsafe_message
from .safetensors_io import read_header

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # with a ".index.json" twin when sharded
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model")
HF_EXTRA = "Hugging Face folders need the 'hf' extra: pip install 'residual-probe[hf]'"


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data


def import_transformers():
    """transformers with every offline flag set first, or a CheckpointError naming the extra."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers
    except ImportError:
        raise CheckpointError(HF_EXTRA) from None
    return transformers


def weight_files(folder: Path) -> tuple[list[Path], bool]:
    """The weight files transformers will read, and whether they are safetensors; checked to exist."""
    for name in WEIGHTS:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map')") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder}: shard {missing[0]} listed in {index.name} is missing")
            return [folder / s for s in shards], name.endswith("safetensors")
        if (folder / name).is_file():
            return [folder / name], name.endswith("safetensors")
    raise CheckpointError(f"{folder}: no weights found (expected {' or '.join(WEIGHTS)}, or a sharded index)")


def check_files(files: list[Path], safetensors: bool) -> None:
    for f in files:
        if safetensors:
            header, start, size = read_header(f)
            end = max((v["data_offsets"][1] for k, v in header.items()
                       if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
                       and len(v["data_offsets"]) == 2), default=0)
            if start + end > size:
                raise CheckpointError(f"{f}: truncated safetensors file ({size} bytes, header says {start + end})")
        else:
            if f.stat().st_size == 0:
                raise CheckpointError(f"{f}: empty file")
            names: set[str] = set()
            try:
                checkpoint_globals(f, names)
            except CheckpointError:
                raise
            except Exception:
                if blocked_globals(names):
                    raise CheckpointError(unsafe_message(f, blocked_globals(names))) from None
                raise CheckpointError(f"{f}: not a PyTorch checkpoint or corrupt") from None
            if blocked_globals(names):
                raise CheckpointError(unsafe_message(f, blocked_globals(names)))


def model_class(transformers, config) -> Any:
    """The class named in config.architectures when transformers has it, else the family's AutoModel."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_hf_dir(path: str | Path, trust: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer or None, description) of a Hugging Face folder."""
    folder = Path(path)
    if not is_hf_dir(folder):
        raise CheckpointError(f"{folder}: config.json is missing, not JSON, or lacks 'model_type'")
    files, safetensors = weight_files(folder)
    check_files(files, safetensors)
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"{folder}/config.json: transformers cannot read it ({_one_line(exc)})") from None
    cls = model_class(transformers, config)
    try:
        model, info = cls.from_pretrained(
            folder, config=config, local_files_only=True, trust_remote_code=False, use_safetensors=safetensors,
            weights_only=not trust, output_loading_info=True,
        )
    except Exception as exc:
        raise CheckpointError(f"{folder}: transformers could not load the weights ({_one_line(exc)})") from None
    model = model.float().eval()
    notes = []
    missing = list(info.get("missing_keys") or [])
    in_blocks = sorted(k for k in missing if re.search(r"\.\d+\.", k))
    if in_blocks:  # a layer left at random initialization would be measured as if trained
        raise CheckpointError(f"{folder}: {len(in_blocks)} layer weights are missing from the files (e.g. {in_blocks[0]})")
    if missing:
        notes.append(f"{len(missing)} weights missing from the files were left at initialization (e.g. {sorted(missing)[0]})")
    if info.get("mismatched_keys"):
        raise CheckpointError(f"{folder}: weights with the wrong shape for the config (e.g. {info['mismatched_keys'][0]})")
    tokenizer = load_tokenizer(transformers, folder, notes)
    desc = {"family": f"huggingface:{config.model_type}", "class": type(model).__name__, "notes": notes,
            "missing_keys": sorted(missing)}
    return model, tokenizer, desc


def load_tokenizer(transformers, folder: Path, notes: list[str]):
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        notes.append(f"tokenizer files present but unusable ({_one_line(exc)}); byte-level tokens used instead")
        return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
