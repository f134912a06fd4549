"""The reference models' configuration: one strict dataclass that round-trips through JSON.

Strict means: unknown keys and conflicting values raise a `ConfigError` that names the fields;
nothing is silently rewritten (torchscale's booleans that reconcile each other are the
counter-example).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

ARCHS = ("decoder", "encoder", "seq2seq")
NORMS = ("layernorm", "rmsnorm")
INITS = ("fairseq", "xiong")


class ConfigError(UserError):
    """An invalid configuration; the message is one line meant for the user."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "seq2seq"  # decoder (causal LM), encoder (bidirectional), seq2seq (translation)
    placement: str = "post-ln"
    depth: int = 6  # blocks per stack (encoder and decoder for seq2seq, unless decoder_depth)
    decoder_depth: int | None = None  # seq2seq only: decoder blocks, when they differ from depth
    d_model: int = 256
    heads: int = 4
    ffn: int = 1024
    vocab_size: int = 256  # byte-level by default: every UTF-8 text is in vocabulary
    max_len: int = 1024  # longest sequence the sinusoidal positions cover
    position_offset: int = 0  # first sinusoidal position index; fairseq checkpoints use padding_idx + 1
    dropout: float = 0.0  # one rate for residual, attention and activation dropout
    norm: str = "layernorm"
    init: str = "fairseq"  # fairseq: what the paper trained with; xiong: W^Q = W^K = 0 (theory)
    alpha: float = 1.0  # ResiDual: weight of the x stream in alpha * x + LN_f(d)
    res_input_norm_scale: float = 1.0  # ResiDual: d_0 = s * x_0 (an fp16 guard in the paper's code)
    mix_ratio: float = 0.25  # Mix-LN: the first ceil(mix_ratio * N) blocks are Post-LN
    tie_embeddings: bool = True  # output projection shares the (decoder) token embedding

    def __post_init__(self) -> None:
        from .placements import PLACEMENTS  # late: placements import this module

        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if self.arch not in ARCHS:
            bad(f"arch: unknown {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.placement not in PLACEMENTS:
            bad(f"placement: unknown {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.norm not in NORMS:
            bad(f"norm: unknown {self.norm!r}; choose one of {', '.join(NORMS)}")
        if self.init not in INITS:
            bad(f"init: unknown {self.init!r}; choose one of {', '.join(INITS)}")
        for name in ("depth", "d_model", "heads", "ffn", "vocab_size", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name}: must be a positive integer, got {value!r}")
        if self.decoder_depth is not None:
            if self.arch != "seq2seq":
                bad(f"decoder_depth: only for arch 'seq2seq', not {self.arch!r} (use depth)")
            if not isinstance(self.decoder_depth, int) or self.decoder_depth < 1:
                bad(f"decoder_depth: must be a positive integer, got {self.decoder_depth!r}")
        if self.d_model % self.heads:
            bad(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if not isinstance(self.position_offset, int) or self.position_offset < 0:
            bad(f"position_offset: must be a non-negative integer, got {self.position_offset!r}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.mix_ratio <= 1.0:
            bad(f"mix_ratio: must be in [0, 1], got {self.mix_ratio}")

    @property
    def encoder_depth(self) -> int:
        return self.depth if self.arch in ("encoder", "seq2seq") else 0

    @property
    def dec_depth(self) -> int:
        if self.arch == "decoder":
            return self.depth
        if self.arch == "seq2seq":
            return self.decoder_depth or self.depth
        return 0

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)
