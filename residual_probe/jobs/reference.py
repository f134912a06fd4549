"""The reference Transformer a job builds, as its spec holds it (`grad-norms`, `bounds`).

`ReferenceModel` carries ModelConfig's fields that the jobs' options set, with ModelConfig's own
defaults (a job whose defaults differ redeclares just those), the batch shape, and `extra` for any
further ModelConfig field; `build_config` makes the ModelConfig, so each field is declared and
passed on in one place. Depth, placement and initialization stay with each job: one measures a
single depth, another a ladder; one an `init` option, another the settings it compares.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from ..models.config import ModelConfig

_DEFAULT = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}


@dataclass
class ReferenceModel:
    arch: str = _DEFAULT["arch"]
    d_model: int = _DEFAULT["d_model"]
    heads: int = _DEFAULT["heads"]
    ffn: int = _DEFAULT["ffn"]
    norm: str = _DEFAULT["norm"]
    dropout: float = _DEFAULT["dropout"]
    qk_norm: bool = _DEFAULT["qk_norm"]
    hc_streams: int = _DEFAULT["hc_streams"]
    batch: int = 8
    seq_len: int = 32
    extra: dict = field(default_factory=dict)  # further ModelConfig fields (none of the above)

    def build_config(self, **job) -> ModelConfig:
        """ModelConfig of these fields, the job's own (`job`: placement, depth, init, or an override of
        one of these fields) and `extra`; positions cover at least 1024 tokens and the sequence."""
        own = {
            "arch": self.arch,
            "d_model": self.d_model,
            "heads": self.heads,
            "ffn": self.ffn,
            "norm": self.norm,
            "dropout": self.dropout,
            "qk_norm": self.qk_norm,
            "hc_streams": self.hc_streams,
            "max_len": max(1024, self.seq_len),
        }
        return ModelConfig(
            **{**own, **job}, **self.extra
        )  # extra naming a field above: TypeError, as before
