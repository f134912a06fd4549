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
from .placements import PLACEMENTS

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
    position_offset: int = (
        0  # first sinusoidal position index; fairseq checkpoints use padding_idx + 1
    )
    dropout: float = 0.0  # fairseq's `dropout`: on the embedding and on every sublayer output
    # fairseq's separate rates (the ResiDual configs: dropout 0.3, attention 0.1, activation 0.1).
    # None means "the same as `dropout`", which is what config.json files written before these
    # keys existed meant by their single rate.
    attention_dropout: float | None = None  # on the attention weights
    activation_dropout: float | None = None  # after the FFN's ReLU
    norm: str = "layernorm"
    # A norm of kind `norm` on each head's q and k over head_dim, in every attention, for any
    # placement (QK-layernorm, Wortsman et al. 2023): bounds the attention logits' growth.
    qk_norm: bool = False
    init: str = "fairseq"  # fairseq: what the paper trained with; xiong: W^Q = W^K = 0 (theory)
    alpha: float = 1.0  # ResiDual: weight of the x stream in alpha * x + LN_f(d)
    # ResiDual: d_0 = s * x_0 and every update enters d as s * b (microsoft/ResiDual), so
    # LN_f(d) does not depend on s up to eps: an fp16 overflow guard, not a weighting.
    res_input_norm_scale: float = 1.0
    mix_ratio: float = 0.25  # Mix-LN: the first floor(mix_ratio * N) blocks are Post-LN (Li et al.)
    hc_streams: int = 4  # hc / mhc: residual copies n (the expansion rate; 4 in both papers)
    hc_dynamic: bool = True  # hc: input-dependent mixing (DHC) as well as the static matrices (SHC)
    tie_embeddings: bool = True  # output projection shares the (decoder) token embedding
    # seq2seq only: encoder and decoder share one token embedding (fairseq's
    # --share-all-embeddings; it implies tie_embeddings, which must then be True).
    share_all_embeddings: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if self.arch not in ARCHS:
            bad(f"arch: unknown {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.placement not in PLACEMENTS:
            bad(f"placement: unknown {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.norm not in NORMS:
            bad(f"norm: unknown {self.norm!r}; choose one of {', '.join(NORMS)}")
        own = PLACEMENTS[self.placement].norm
        if own is not None and self.norm != "layernorm":
            bad(f"norm: placement {self.placement!r} makes every norm {own}; leave norm unset")
        if self.init not in INITS:
            bad(f"init: unknown {self.init!r}; choose one of {', '.join(INITS)}")
        for name in ("depth", "d_model", "heads", "ffn", "vocab_size", "max_len", "hc_streams"):
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
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            value = getattr(self, name)
            if value is None and name != "dropout":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0.0 <= value < 1.0
            ):
                bad(f"{name}: must be in [0, 1), got {value!r}")
        if self.share_all_embeddings:
            if self.arch != "seq2seq":
                bad(f"share_all_embeddings: only for arch 'seq2seq', not {self.arch!r}")
            if not self.tie_embeddings:
                bad(
                    "share_all_embeddings=True needs tie_embeddings=True (fairseq: sharing all "
                    "embeddings shares the decoder's input and output embedding too)"
                )
        for name in ("tie_embeddings", "share_all_embeddings", "qk_norm", "hc_dynamic"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if not self.res_input_norm_scale > 0:
            bad(f"res_input_norm_scale: must be positive, got {self.res_input_norm_scale}")
        if not 0.0 <= self.mix_ratio <= 1.0:
            bad(f"mix_ratio: must be in [0, 1], got {self.mix_ratio}")

    @classmethod
    def iwslt(cls, **changes: Any) -> "ModelConfig":
        """The ResiDual paper's IWSLT'14 De-En model (microsoft/ResiDual hydra_config/iwslt.yaml):
        6+6 blocks, d 256, FFN 1024, 4 heads, dropout 0.3 / attention 0.1 / activation 0.1,
        all embeddings shared; the placement defaults to `residual`. `changes` override fields."""
        base = dict(
            arch="seq2seq",
            placement="residual",
            depth=6,
            d_model=256,
            heads=4,
            ffn=1024,
            dropout=0.3,
            attention_dropout=0.1,
            activation_dropout=0.1,
            share_all_embeddings=True,
            tie_embeddings=True,
        )
        return cls(**{**base, **changes})

    @property
    def attention_dropout_rate(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @property
    def activation_dropout_rate(self) -> float:
        return self.dropout if self.activation_dropout is None else self.activation_dropout

    def stack_depth(self, role: str) -> int:
        """Blocks in the "encoder" or "decoder" stack: `depth`, or `decoder_depth` for a seq2seq
        decoder that sets it; 0 for a stack the architecture has not."""
        if role == "encoder":
            return self.depth if self.arch in ("encoder", "seq2seq") else 0
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
