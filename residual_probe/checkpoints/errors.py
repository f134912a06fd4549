"""The one exception a user sees when a checkpoint cannot be loaded."""

from __future__ import annotations


class CheckpointError(ValueError):
    """An unusable checkpoint (missing, corrupt, unsupported or unsafe); the message is one line."""
