"""Probe integrations for other people's training loops and loggers.

Each module imports its framework when it is imported, so `import residual_probe` never needs
them; a missing one raises `MissingExtraError` naming the extra to install:

- `residual_probe.integrations.hf`          Hugging Face `Trainer` callback   (`pip install residual-probe[hf]`)
- `residual_probe.integrations.lightning`   Lightning callback                (`pip install residual-probe[lightning]`)
- `residual_probe.integrations.tensorboard` summaries to a `SummaryWriter`    (`pip install residual-probe[tensorboard]`)
- `residual_probe.integrations.wandb`       summaries to a W&B run            (`pip install residual-probe[wandb]`)
"""

from __future__ import annotations

import importlib

from ..errors import UserError

# the optional packages and the extra (pyproject.toml) that installs each
EXTRA_OF = {
    "transformers": "hf",
    "accelerate": "hf",
    "safetensors": "safetensors",
    "lightning": "lightning",
    "pytorch_lightning": "lightning",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
}


def missing_extra(exc: ImportError) -> "MissingExtraError | None":
    """The user error for an ImportError of an optional package (None for any other import error: a bug)."""
    top = (getattr(exc, "name", None) or "").split(".")[0]
    if top not in EXTRA_OF:
        return None
    return MissingExtraError(
        f"this needs the optional package '{top}', which is not installed; install it with: "
        f"pip install 'residual-probe[{EXTRA_OF[top]}]'"
    )


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, what: str):
    """Import `module` or raise MissingExtraError with one line naming `pip install residual-probe[extra]`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{what} needs the '{module.split('.')[0]}' package ({exc}); install it with: "
            f"pip install 'residual-probe[{extra}]'"
        ) from None
