"""Loading models from files: residual-probe's own format, Hugging Face folders, fairseq checkpoints,
bare state dicts. Everything here treats a file as untrusted input (see safe_pickle)."""

from .errors import CheckpointError
from .load import LoadedModel, load_any
from .native import load_model, save_model

__all__ = ["CheckpointError", "LoadedModel", "load_any", "load_model", "save_model"]
