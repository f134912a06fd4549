"""The probe's user error, in a module of its own: the schedule, the parameter plan, the sinks
and the Probe all raise it, and none of them should import another for it."""

from __future__ import annotations

from ..errors import UserError


class ProbeError(UserError):
    """Invalid probe settings (unknown quantity, bad schedule, unusable sink); one line for the user."""
