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
from .loaded import LoadedModel, first_names, missing_notes
from .registry import Source, register
from .safe_pickle import load_pickle, one_line
from .safetensors_io import read_header

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # with a ".index.json" twin when sharded
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
)
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
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would break one-line errors
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
                raise CheckpointError(
                    f"{index}: not a valid shard index (needs a 'weight_map')"
                ) from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{folder}: shard {missing[0]} listed in {index.name} is missing"
                )
            return [folder / s for s in shards], name.endswith("safetensors")
        if (folder / name).is_file():
            return [folder / name], name.endswith("safetensors")
    raise CheckpointError(
        f"{folder}: no weights found (expected {' or '.join(WEIGHTS)}, or a sharded index)"
    )


def check_safetensors(files: list[Path]) -> None:
    """Each file's header parses and its tensors fit in the file (pickles are checked as loaded)."""
    for f in files:
        header, start, size = read_header(f)
        end = max(
            (
                v["data_offsets"][1]
                for k, v in header.items()
                if k != "__metadata__"
                and isinstance(v, dict)
                and isinstance(v.get("data_offsets"), list)
                and len(v["data_offsets"]) == 2
            ),
            default=0,
        )
        if start + end > size:
            raise CheckpointError(
                f"{f}: truncated safetensors file ({size} bytes, header says {start + end})"
            )


AUTO_HEADS = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModel")


def stored_names(files: list[Path], safetensors: bool) -> tuple[set[str], dict[str, str]]:
    """(names of the tensors in the files, aliases {dropped name: stored name}).

    `safetensors.torch.save_model` stores a shared tensor once, under one of its names, and records
    every dropped name in the file's metadata as {dropped: kept}; the same metadata also holds
    plain entries such as {"format": "pt"}, which name no tensor and are ignored here.
    """
    names: set[str] = set()
    meta: dict[str, str] = {}
    for f in files:
        if safetensors:
            header, _, _ = read_header(f)
            names |= {k for k in header if k != "__metadata__"}
            raw = header.get("__metadata__")
            meta.update({str(k): str(v) for k, v in (raw if isinstance(raw, dict) else {}).items()})
        else:
            import torch

            state = state_dict_file(f)
            names |= {k for k, v in state.items() if isinstance(v, torch.Tensor)}
    aliases = {k: v for k, v in meta.items() if v in names and k not in names}
    return names, aliases


def state_dict_file(f: Path) -> dict:
    """A pickled state dict, loaded by the one safe path (`load_pickle`), its tensors memory-mapped."""
    state = load_pickle(f, mmap=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{f}: not a state dict")
    return state


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def _fit(cls, config, stored: set[str]) -> tuple[int, int] | None:
    """(stored weights the class would not use, class weights absent from the files), prefixes ignored."""
    import torch

    try:
        with torch.device("meta"):
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    except (
        Exception
    ):  # the class does not take this config (e.g. no seq2seq head for a decoder-only family)
        return None
    prefix = getattr(model, "base_model_prefix", "")
    expected = {_strip(k, prefix) for k in model.state_dict()}
    have = {_strip(k, prefix) for k in stored}
    return len(have - expected), len(expected - have)


def model_class(transformers, config, stored: set[str] | None = None) -> Any:
    """The class named in config.architectures when transformers has it; otherwise the Auto class
    (causal LM, seq2seq LM, masked LM, bare model) whose weights best match the stored ones, so a
    stored LM head is used, not dropped, and a head's tied input embedding is not left random."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if not stored:
        return transformers.AutoModel
    scored = []
    for rank, name in enumerate(AUTO_HEADS):
        fit = _fit(getattr(transformers, name), config, stored)
        if fit is not None:
            scored.append((fit, rank, name))
    return getattr(transformers, min(scored)[2]) if scored else transformers.AutoModel


def fill_missing(
    model, missing: list[str], files: list[Path], safetensors: bool, aliases: dict[str, str]
) -> list[str]:
    """Load weights transformers reported missing from their stored alias (safetensors metadata),
    looking under the name with and without the base-model prefix; returns the names still missing."""
    import torch

    prefix = getattr(model, "base_model_prefix", "")
    targets = {}
    for key in missing:
        for name in (key, f"{prefix}.{key}" if prefix else key, _strip(key, prefix)):
            if name in aliases:
                targets[key] = aliases[name]
                break
    if not targets:
        return list(missing)
    wanted = set(targets.values())
    found: dict[str, torch.Tensor] = {}
    for f in files:
        if safetensors:
            header, _, _ = read_header(f)
            if not wanted & set(header):
                continue
            from .safetensors_io import load_file

            tensors, _ = load_file(f)
        else:
            tensors = state_dict_file(f)
        found.update({k: v for k, v in tensors.items() if k in wanted})
    state = model.state_dict()
    with torch.no_grad():
        for key, source in targets.items():
            t = found.get(source)
            if t is None or tuple(t.shape) != tuple(state[key].shape):
                continue
            state[key].copy_(t.to(state[key].dtype))
    return [
        k
        for k in missing
        if k not in targets
        or targets[k] not in found
        or tuple(found[targets[k]].shape) != tuple(state[k].shape)
    ]


def load_hf_dir(
    path: str | Path, trust: bool = False, allow_missing: bool = False, allow_unused: bool = False
) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer or None, description) of a Hugging Face folder.

    Tied and aliased weights are resolved as `from_pretrained` does (the config's tie flags, which
    transformers applies) plus the safetensors metadata aliases that `safetensors.torch.save_model`
    writes; a weight still missing after that would be measured at its random initialization, so
    it is an error unless `allow_missing` (then desc["missing_keys"] lists them).
    """
    folder = Path(path)
    if not is_hf_dir(folder):
        raise CheckpointError(f"{folder}: config.json is missing, not JSON, or lacks 'model_type'")
    files, safetensors = weight_files(folder)
    if safetensors:
        check_safetensors(files)
    stored, aliases = stored_names(files, safetensors)
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise CheckpointError(
            f"{folder}/config.json: transformers cannot read it ({one_line(exc)})"
        ) from None
    cls = model_class(transformers, config, stored | set(aliases))
    try:
        model, info = cls.from_pretrained(
            folder,
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=safetensors,
            weights_only=not trust,
            output_loading_info=True,
        )
    except Exception as exc:
        raise CheckpointError(
            f"{folder}: transformers could not load the weights ({one_line(exc)})"
        ) from None
    if info.get("mismatched_keys"):
        raise CheckpointError(
            f"{folder}: weights with the wrong shape for the config (e.g. {sorted(info['mismatched_keys'])[0]})"
        )
    missing = sorted(
        fill_missing(model, sorted(info.get("missing_keys") or []), files, safetensors, aliases),
        key=natural_key,
    )
    model = model.float().eval()
    if missing and not allow_missing:  # a weight left at random init would be measured as trained
        raise CheckpointError(
            f"{folder}: {len(missing)} weights are missing from the files ({first_names(missing)}); "
            "pass --allow-missing-weights to measure them at random initialization"
        )
    notes = missing_notes(missing)
    unused = sorted(info.get("unexpected_keys") or [], key=natural_key)
    omitted = omitted_blocks(unused, config)
    if omitted and not allow_unused:  # the config declares fewer blocks than the files hold
        raise CheckpointError(
            f"{folder}: the files hold weights of blocks the config does not declare ({omitted}); the model "
            "would be a truncated copy. Fix config.json, or pass --allow-unused-weights to measure the truncated model"
        )
    if unused:
        notes.append(
            f"{len(unused)} stored weights are not used by {cls.__name__} (e.g. {unused[0]})"
        )
    tokenizer = load_tokenizer(transformers, folder, notes)
    desc = {
        "family": f"huggingface:{config.model_type}",
        "class": type(model).__name__,
        "notes": notes,
        "missing_keys": missing,
    }
    return model, tokenizer, desc


def natural_key(name: str) -> list:
    """Sort key reading the digit runs as numbers: layers.2 before layers.10 before layers.100."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def omitted_blocks(unused: list[str], config) -> str:
    """The unused stored weights that belong to block indices at or past the config's layer count,
    described ("layers 3-5, 48 weights"); "" when there are none."""
    n = next(
        (
            getattr(config, k)
            for k in ("num_hidden_layers", "n_layer", "num_layers")
            if isinstance(getattr(config, k, None), int)
        ),
        None,
    )
    if n is None:
        return ""
    found = set()
    count = 0
    for name in unused:
        idx = [int(t) for t in name.split(".") if t.isdigit()]
        if idx and idx[0] >= n:
            found.add(idx[0])
            count += 1
    if not found:
        return ""
    return f"layers {min(found)}-{max(found)}, {count} weights; config.json declares {n} layer{'s' if n != 1 else ''}"


def _forward_args(module) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


def head_kind(transformers, model) -> str | None:
    """causal-lm / seq2seq / mlm for a class transformers lists under that task, else None (no loss head)."""
    from transformers.models.auto import modeling_auto as auto

    name = type(model).__name__
    tables = [
        ("causal-lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ("mlm", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    ]
    if getattr(
        model.config, "is_encoder_decoder", False
    ):  # BART's ForConditionalGeneration is listed as both
        tables.insert(0, ("seq2seq", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES))
    for kind, table in tables:
        if name in {v for v in table.values() if isinstance(v, str)}:
            return kind
    return None


def hf_loaded(transformers, model, tokenizer, desc: dict, source: str) -> LoadedModel:
    config = model.config
    base = model.base_model if model.base_model is not model else model
    extra = {"use_cache": False} if hasattr(config, "use_cache") else {}
    image = getattr(config, "image_size", None) if "pixel_values" in _forward_args(base) else None
    if image:
        size = image if isinstance(image, int) else image[0]
        shape = (int(getattr(config, "num_channels", 3)), int(size), int(size))
        return LoadedModel(
            model,
            lambda px: base(pixel_values=px),
            desc["family"],
            source,
            modality="image",
            image_shape=shape,
            notes=desc["notes"],
            missing_weights=desc["missing_keys"],
        )
    # the stacks alone: no LM head even when base is the model
    if getattr(config, "is_encoder_decoder", False):
        enc, dec = model.get_encoder(), model.get_decoder()

        def fwd(ids):
            memory = enc(input_ids=ids).last_hidden_state
            return dec(input_ids=ids, encoder_hidden_states=memory, **extra)
    else:

        def fwd(ids):
            return base(input_ids=ids, **extra)

    kind = head_kind(transformers, model)
    heads = {}
    if kind == "seq2seq":
        heads[kind] = lambda src, tgt: model(input_ids=src, decoder_input_ids=tgt, **extra).logits
    elif kind is not None:
        heads[kind] = lambda ids: model(input_ids=ids, **extra).logits
    mask = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    start = getattr(config, "decoder_start_token_id", None)
    if start is None and kind == "seq2seq":
        start = getattr(config, "bos_token_id", None) or 0
    max_len = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return LoadedModel(
        model,
        fwd,
        desc["family"],
        source,
        vocab_size=getattr(config, "vocab_size", None),
        max_len=max_len,
        tokenizer=tokenizer,
        notes=desc["notes"],
        missing_weights=desc["missing_keys"],
        heads=heads,
        default_loss=kind,
        mask_id=mask,
        decoder_start_id=start,
    )


@register("huggingface", 20, lambda s: s.path.is_dir() and is_hf_dir(s.path))
def load_hf_source(source: Source) -> LoadedModel:
    source.no_bare_flags("a folder")
    model, tokenizer, desc = load_hf_dir(
        source.path,
        trust=source.trust_pickle,
        allow_missing=source.allow_missing,
        allow_unused=source.allow_unused,
    )
    return hf_loaded(import_transformers(), model, tokenizer, desc, str(source.path))


def load_tokenizer(transformers, folder: Path, notes: list[str]):
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        notes.append(
            f"tokenizer files present but unusable ({one_line(exc)}); byte-level tokens used instead"
        )
        return None
