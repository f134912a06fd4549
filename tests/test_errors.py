"""One base class for user errors; the CLI maps it to exit 2 and anything else to exit 1."""

import sys

import pytest
from typer.testing import CliRunner

from residual_probe.cli import app
from residual_probe.errors import UserError

runner = CliRunner()


def package_exceptions() -> set[type]:
    """Every exception class defined in residual_probe, found by importing each of its modules.

    An integration whose framework is not installed raises MissingExtraError on import; only
    then is it skipped (its classes cannot be defined without the framework)."""
    import importlib
    import inspect
    import pkgutil

    import residual_probe
    from residual_probe.integrations import MissingExtraError

    found = set()
    for info in pkgutil.walk_packages(residual_probe.__path__, "residual_probe."):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI on import
            continue
        try:
            module = importlib.import_module(info.name)
        except MissingExtraError:
            assert info.name.startswith("residual_probe.integrations."), info.name
            continue
        found |= {
            c
            for c in vars(module).values()
            if inspect.isclass(c)
            and issubclass(c, BaseException)
            and c.__module__.startswith("residual_probe")
        }
    return found


def test_every_error_the_package_defines_is_a_user_error_the_cli_answers_with_exit_2(
    monkeypatch,
):
    """Discovered, not listed: a new error class cannot be missed. Each, raised inside a command,
    gives one line on stderr and exit 2 (a user error), not exit 1 (a bug)."""
    import residual_probe.jobs.grad_norms as job

    classes = package_exceptions()
    assert {"CheckpointError", "FolderError", "ProbeError"} <= {c.__name__ for c in classes}
    assert [c for c in classes if not issubclass(c, UserError)] == []
    monkeypatch.delenv("RESIDUAL_PROBE_DEBUG", raising=False)
    for cls in sorted(classes, key=lambda c: c.__qualname__):

        def boom(*args, cls=cls, **kwargs):
            raise cls(f"bad input for {cls.__name__}")

        monkeypatch.setattr(job, "run_grad_norms", boom)
        result = runner.invoke(app, ["grad-norms", "--depth", "2"])
        assert result.exit_code == 2, (cls, result.output)
        assert result.stderr.strip() == f"error: bad input for {cls.__name__}", cls


@pytest.mark.parametrize(
    "exc,code,prefix",
    [
        (UserError("bad option --x"), 2, "error: bad option --x"),
        (
            ValueError("a bug, not the user's input"),
            1,
            "internal error: ValueError: a bug, not the user's input",
        ),
        (
            ZeroDivisionError("division by zero"),
            1,
            "internal error: ZeroDivisionError: division by zero",
        ),
    ],
)
def test_cli_maps_user_errors_to_2_and_bugs_to_1(monkeypatch, exc, code, prefix):
    import residual_probe.jobs.grad_norms as job

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.delenv("RESIDUAL_PROBE_DEBUG", raising=False)
    monkeypatch.setattr(job, "run_grad_norms", boom)
    result = runner.invoke(app, ["grad-norms", "--depth", "2"])
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    assert ("RESIDUAL_PROBE_DEBUG=1" in lines[0]) == (code == 1)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("sigterm", [False, True], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_inside_an_extensions_import_is_still_an_interrupt(monkeypatch, sigterm):
    """pybind11 modules raise ImportError("initialization failed") from the KeyboardInterrupt a
    signal raised while they initialised (a CI run's SIGTERM test met it): 130/143, not a bug."""
    import residual_probe.jobs.grad_norms as job

    cli_app = sys.modules["residual_probe.cli.app"]  # the package's `app` is the Typer object

    def interrupted_import(*args, **kwargs):
        if sigterm:
            cli_app._signal_received.append(15)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("initialization failed") from stop

    monkeypatch.delenv("RESIDUAL_PROBE_DEBUG", raising=False)
    monkeypatch.setattr(job, "run_grad_norms", interrupted_import)
    result = runner.invoke(app, ["grad-norms", "--depth", "2"])
    assert result.exit_code == (143 if sigterm else 130), result.stderr
    word = "terminated (SIGTERM)" if sigterm else "interrupted"
    assert result.stderr.strip().splitlines() == [
        f"error: {word}; files already written are complete"
    ]


def test_unwritable_file_is_a_user_error(tmp_path):
    from residual_probe.output import OutputError, write_atomic

    with pytest.raises(OutputError, match="cannot write"):
        write_atomic(tmp_path / "missing-folder" / "x.csv", "a\n")
    assert not list(tmp_path.iterdir())


def test_atomic_writer_modes_and_callables(tmp_path):
    from residual_probe.output import FILE_MODE, write_atomic

    write_atomic(tmp_path / "a.txt", "text")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "c.dat", lambda tmp: tmp.write_bytes(b"by callable"))
    assert (tmp_path / "a.txt").read_text() == "text" and (
        tmp_path / "b.bin"
    ).read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.dat").read_bytes() == b"by callable"
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {FILE_MODE}

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "d.dat", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.dat"]
