"""One base class for user errors; the CLI maps it to exit 2 and anything else to exit 1."""

import pytest
from typer.testing import CliRunner

from residual_probe.cli import app
from residual_probe.errors import UserError

runner = CliRunner()


def test_every_user_facing_error_derives_from_user_error():
    from residual_probe.analysis.fits import FitError
    from residual_probe.analysis.metrics import MetricError
    from residual_probe.budget import BudgetError
    from residual_probe.checkpoints.errors import CheckpointError
    from residual_probe.checkpoints.text import TextError
    from residual_probe.data import DataError
    from residual_probe.integrations import MissingExtraError
    from residual_probe.jobs.bounds import BoundsError
    from residual_probe.jobs.ckpt_grads import NoLossHead
    from residual_probe.jobs.plot import PlotError
    from residual_probe.models import ConfigError
    from residual_probe.output import OutputError
    from residual_probe.probe.discovery import DiscoveryError
    from residual_probe.probe.errors import ProbeError
    from residual_probe.probe.records import SinkError
    from residual_probe.studies import StudyError

    for cls in (
        FitError,
        MetricError,
        CheckpointError,
        DataError,
        BoundsError,
        ConfigError,
        OutputError,
        DiscoveryError,
        ProbeError,
        StudyError,
        BudgetError,
        TextError,
        MissingExtraError,
        PlotError,
        SinkError,
        NoLossHead,
    ):
        assert issubclass(cls, UserError), cls


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
