"""One entry point for every checkpoint format: `load_any(path)` -> a `LoadedModel`.

Formats, told apart by content rather than by file name:
- a folder with residual-probe's config.json (native), or with a Hugging Face config.json;
- a torch pickle holding a fairseq checkpoint (`model` plus `cfg` or `args`);
- a bare state dict (a torch pickle or a .safetensors file of tensors), rebuilt from its
  shapes plus the placement and head count the user gives (the weights cannot say them).
A `LoadedModel` also knows how to run the model's body (no output head: logits are not needed
and would dominate memory) on a batch of token ids or images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..models import ConfigError, ModelConfig, Transformer
from .errors import CheckpointError
from .fairseq import PADDING_IDX, is_fairseq, load_fairseq
from .huggingface import is_hf_dir, load_hf_dir
from .layout import from_fairseq, looks_fairseq, shapes
from .native import is_native, load_exact, load_model
from .safe_pickle import load_pickle
from .safetensors_io import is_safetensors, load_file

BARE_FIELDS = ("placement", "depth", "decoder_depth", "d_model", "heads", "ffn", "vocab_size", "arch", "norm",
               "max_len", "position_offset", "alpha")


@dataclass
class LoadedModel:
    model: nn.Module  # the whole model, in eval mode; the probe attaches here
    forward: Callable[[torch.Tensor], Any]  # runs the body on a batch (B, T) of ids, or (B, C, H, W) images
    family: str  # residual-probe, fairseq, huggingface:<model_type>, state-dict
    source: str
    modality: str = "text"  # "text" or "image"
    vocab_size: int | None = None
    max_len: int | None = None  # longest sequence the positions cover (None: unbounded)
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) for image models
    tokenizer: Any = None  # a Hugging Face tokenizer when the folder has one
    declared_placement: str | None = None  # from the config, where it names one
    notes: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


def body_forward(model: Transformer) -> Callable[[torch.Tensor], torch.Tensor]:
    """Our Transformer's stacks without the output projection; seq2seq reads the same ids as target."""
    if model.cfg.arch == "seq2seq":
        return lambda ids: model.decoder(ids, memory=model.encoder(ids))
    stack = model.encoder or model.decoder
    return lambda ids: stack(ids)


def ours(model: Transformer, family: str, source: str, notes: list[str] | None = None) -> LoadedModel:
    cfg = model.cfg
    return LoadedModel(model, body_forward(model), family, source, vocab_size=cfg.vocab_size, max_len=cfg.max_len,
                       declared_placement=cfg.placement, notes=list(notes or []))


def hf_loaded(model: nn.Module, tokenizer: Any, desc: dict, source: str) -> LoadedModel:
    config = model.config
    base = model.base_model if model.base_model is not model else model
    extra = {"use_cache": False} if hasattr(config, "use_cache") else {}
    image = getattr(config, "image_size", None) if "pixel_values" in _forward_args(base) else None
    if image:
        size = image if isinstance(image, int) else image[0]
        shape = (int(getattr(config, "num_channels", 3)), int(size), int(size))
        return LoadedModel(model, lambda px: base(pixel_values=px), desc["family"], source, modality="image",
                           image_shape=shape, notes=desc["notes"])
    if getattr(config, "is_encoder_decoder", False):  # the stacks alone: no LM head even when base is the model
        enc, dec = model.get_encoder(), model.get_decoder()
        fwd = lambda ids: dec(input_ids=ids, encoder_hidden_states=enc(input_ids=ids).last_hidden_state, **extra)  # noqa: E731
    else:
        fwd = lambda ids: base(input_ids=ids, **extra)  # noqa: E731
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    vocab = getattr(config, "vocab_size", None)
    return LoadedModel(model, fwd, desc["family"], source, vocab_size=vocab, max_len=max_len, tokenizer=tokenizer,
                       notes=desc["notes"])


def _forward_args(module: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


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
        raise CheckpointError(f"{source}: not a state dict: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor")
    return dict(obj)


def load_bare(state: dict[str, torch.Tensor], source: str, given: dict[str, Any]) -> Transformer:
    """A reference model from bare weights: sizes read from shapes, checked against what the user gave."""
    fairseq_names = looks_fairseq(state)
    if fairseq_names:
        state = from_fairseq(state)
    found = shapes(state)
    for key, value in found.items():
        if given.get(key) is not None and given[key] != value:
            raise CheckpointError(f"{source}: --{key.replace('_', '-')} {given[key]} but the weights have {value}")
    for key in ("placement", "heads"):
        if given.get(key) is None:
            raise CheckpointError(f"{source}: a bare state dict does not record its {key}: pass --{key}")
    fields = {**found, **{k: v for k, v in given.items() if v is not None}}
    if fairseq_names:
        fields.setdefault("position_offset", PADDING_IDX + 1)
    last = "encoder" if found["arch"] == "encoder" else "decoder"  # the output projection reads this stack
    proj, emb = state.get("output_projection.weight"), state.get(f"{last}.embed.embed_tokens.weight")
    fields["tie_embeddings"] = proj is None or (emb is not None and proj.shape == emb.shape and torch.equal(proj, emb))
    if fields["tie_embeddings"]:
        state.pop("output_projection.weight", None)
    fields.setdefault("max_len", 1024)
    try:
        cfg = ModelConfig(dropout=0.0, **fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    model = Transformer(cfg)
    load_exact(model, {k: v.float() for k, v in state.items()}, source)
    return model.eval()


def load_any(path: str | Path, trust_pickle: bool = False, **given: Any) -> LoadedModel:
    """Load any supported checkpoint; `given` holds BARE_FIELDS for bare state dicts (None: not given)."""
    p = Path(path)
    unknown = sorted(set(given) - set(BARE_FIELDS))
    if unknown:
        raise TypeError(f"load_any: unknown options {unknown}")
    flags = {k: v for k, v in given.items() if v is not None}
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        _no_flags(flags, p, "a folder")
        if is_native(p):
            return ours(load_model(p), "residual-probe", str(p))
        if is_hf_dir(p):
            model, tokenizer, desc = load_hf_dir(p, trust=trust_pickle)
            return hf_loaded(model, tokenizer, desc, str(p))
        raise CheckpointError(f"{p}: folder holds neither a residual-probe model nor a Hugging Face model "
                              "(config.json with 'format' or 'model_type')")
    if is_safetensors(p) or p.suffix.lower() == ".safetensors":  # named so: read as one, or told it is not one
        tensors, _ = load_file(p)
        return ours(load_bare(tensors, str(p), flags), "state-dict", str(p))
    obj = load_pickle(p, trust=trust_pickle)
    if is_fairseq(obj):
        _no_flags(flags, p, "a fairseq checkpoint (its cfg says them)")
        model, desc = load_fairseq(obj, str(p))
        loaded = ours(model, "fairseq", str(p), desc["notes"])
        loaded.family = f"fairseq:{desc['fairseq_arch']}"
        return loaded
    return ours(load_bare(state_dict_of(obj, str(p)), str(p), flags), "state-dict", str(p))


def _no_flags(flags: dict, p: Path, what: str) -> None:
    if flags:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(flags))
        raise CheckpointError(f"{p}: {names} only apply to bare state dicts; this is {what}")
