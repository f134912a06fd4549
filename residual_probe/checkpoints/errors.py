"""The one exception a user sees when a checkpoint cannot be loaded."""

from __future__ import annotations

from ..errors import UserError


class CheckpointError(UserError):
    """An unusable checkpoint (missing, corrupt, unsupported or unsafe); the message is one line."""
