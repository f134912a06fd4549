"""Loading models from files: residual-probe's own format, Hugging Face folders, fairseq checkpoints,
bare state dicts. Everything here treats a file as untrusted input (see safe_pickle).

Each format is one module that registers its loader (registry.register); importing it here is
what makes `load_any` know it.
"""

from . import fairseq, huggingface, native, state_dict  # noqa: F401  (each registers its format)
from .errors import CheckpointError
from .loaded import LOSSES, LoadedModel
from .native import load_model, save_model
from .registry import FORMATS, load_any

__all__ = [
    "CheckpointError",
    "FORMATS",
    "LOSSES",
    "LoadedModel",
    "load_any",
    "load_model",
    "save_model",
]
