"""Reference Transformers and the norm placements (docs/design.md, section 1 "Norm placements")."""

from .config import ConfigError, ModelConfig
from .placements import PLACEMENTS, Placement, register
from .transformer import Block, Stack, Transformer, build_model

__all__ = [
    "ConfigError",
    "ModelConfig",
    "PLACEMENTS",
    "Placement",
    "register",
    "Block",
    "Stack",
    "Transformer",
    "build_model",
]
