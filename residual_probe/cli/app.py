"""The Typer app, and how a command ends: errors, interrupts and SIGTERM.

Errors in the user's input (`residual_probe.errors.UserError`) end the command with one `error:`
line on stderr and exit status 2; any other exception is a bug and ends with one
`internal error:` line and exit status 1 (RESIDUAL_PROBE_DEBUG=1 shows the traceback). Ctrl-C
exits 130, SIGTERM 143, keeping the files already written.
"""

from __future__ import annotations

import contextlib
import os
import sys

import typer

app = typer.Typer(
    name="residual-probe",
    help="Diagnose residual connections and norm placement in Transformers: "
    "vanishing gradients (the Post-LN failure) and representation collapse (the Pre-LN failure).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Diagnose residual connections and norm placement in Transformers."""


# SIGTERM (a cluster's preemption, `kill`) is handled like Ctrl-C: the job stops where it is,
# keeps what an interrupt keeps, and the command exits 143 (128 + 15) instead of 130.
_signal_received: list[int] = []


def install_sigterm():
    """Handle SIGTERM like Ctrl-C until `restore`; returns the previous handler (None: not installed)."""
    import signal

    _signal_received.clear()

    def on_sigterm(signum, frame):
        if _signal_received:  # already stopping: let the job finish saving
            return
        _signal_received.append(signum)
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        return None


def restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _stopped() -> None:
    """End an interrupted command: 143 after SIGTERM, else 130 (Ctrl-C)."""
    if _signal_received:
        fail("terminated (SIGTERM); files already written are complete", code=143)
    fail("interrupted; files already written are complete", code=130)


def _interrupt_beneath(exc: BaseException) -> bool:
    """Whether `exc` was raised while a KeyboardInterrupt was being handled or because of one.

    A pybind11 extension (matplotlib's, scipy's) that a signal interrupts while it initialises
    raises ImportError("initialization failed") from the KeyboardInterrupt: still an interrupt."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def user_errors():
    """One stderr line for any exception: UserError exit 2, interrupt 130, anything else (a bug) exit 1.

    Set RESIDUAL_PROBE_DEBUG=1 to see the traceback instead.
    """
    from ..errors import UserError

    previous = (
        install_sigterm()
    )  # for this command only: an embedding process keeps its own handler
    try:
        if os.environ.get("RESIDUAL_PROBE_DEBUG"):
            yield
            return
        try:
            yield
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _stopped()
        except UserError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except Exception as exc:
            if _interrupt_beneath(exc):  # the signal landed in an import that re-raised it
                _stopped()
            from ..integrations import missing_extra

            extra = missing_extra(exc) if isinstance(exc, ImportError) else None
            if extra is not None:  # an optional package is missing: the user's to install
                fail(str(extra))
            first = str(exc).splitlines()[0] if str(exc) else ""
            typer.echo(
                f"internal error: {type(exc).__name__}: {first} (set RESIDUAL_PROBE_DEBUG=1 for the traceback)",
                err=True,
            )
            raise typer.Exit(1) from None
    finally:
        restore_sigterm(previous)


def main() -> None:
    """The console entry point: `app`, with an interrupted command's exit status kept.

    CPython exits by SIGINT (status -2, whatever sys.exit said) when a KeyboardInterrupt went
    unhandled in code it ran from a string (dataclass and typing machinery during imports) even if
    an outer handler caught it: a SIGTERM landing there lost the documented 143. An interrupted
    command has written its files, so it leaves at once with its own status."""
    try:
        app()
    except SystemExit as exc:
        if _signal_received or exc.code == 130:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        raise
