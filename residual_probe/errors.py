"""The one base class of the errors a user can fix.

Every error caused by the user's input (a bad option, an unreadable or corrupt file, an
unusable output folder, a model in which no blocks can be found) derives from `UserError`.
The CLI turns a `UserError` into one `error: ...` line on stderr and exit status 2; any other
exception is a bug in residual-probe and ends with one `internal error: ...` line and exit
status 1 (set RESIDUAL_PROBE_DEBUG=1 for the traceback).

`UserError` is a `ValueError`, so code that caught the library's errors as ValueError still
does; the CLI, though, catches `UserError` only: a stray ValueError from a bug is not blamed on
the user.
"""

from __future__ import annotations


class UserError(ValueError):
    """An error in the user's input; the message is one line meant for the user."""
