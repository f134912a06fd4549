"""Honest files: a run that fails on bad input leaves nothing behind (no empty --out folder)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from residual_probe.cli import app

TINY = ["--depth", "2", "--d-model", "16", "--heads", "2", "--ffn", "32"]


def cases(tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    corrupt = tmp_path / "w.safetensors"
    corrupt.write_text("not weights\n" * 4)
    return {
        "train, missing data": ["train", *TINY, "--steps", "2", "--data", str(tmp_path / "nope.txt")],
        "grad-norms, binary data": ["grad-norms", *TINY, "--seeds", "1", "--data", str(binary)],
        "collapse, corrupt checkpoint": ["collapse", "--ckpt", str(corrupt), "--placement", "pre-ln", "--heads", "2"],
        "collapse, missing checkpoint": ["collapse", "--ckpt", str(tmp_path / "absent.pt")],
    }


@pytest.mark.parametrize("name", ["train, missing data", "grad-norms, binary data", "collapse, corrupt checkpoint",
                                  "collapse, missing checkpoint"])
def test_a_failed_run_leaves_no_output_folder(tmp_path, name):
    args = cases(tmp_path)[name]
    out = tmp_path / "new" / "nested" / "out"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.output
    assert not (tmp_path / "new").exists()  # not the folder, nor the parents it would have made


def test_an_existing_output_folder_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, [*cases(tmp_path)["train, missing data"], "--out", str(out)])
    assert result.exit_code == 2
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_the_bounds_table_fits_a_terminal():
    import io

    from rich.console import Console

    from residual_probe.cli import checks_table

    long = "Xiong T1: pre-ln last-block W2 grad ~ L^-0.5 (Theorem 1, uniform attention, d x d FFN) " * 2
    checks = [{"statement": long, "setting": "fairseq/encoder", "placement": p, "predicted": "slope -0.5 (+-0.15)",
               "measured": "slope -0.410 from 2 depths (no spread: a line through two points)", "agreement": "yes"}
              for p in ("post-ln", "pre-ln", "residual")]
    for width in (80, 120):
        buf = io.StringIO()
        Console(file=buf, width=width).print(checks_table(checks))
        lines = buf.getvalue().splitlines()
        assert max(len(line) for line in lines) <= width
        assert "…" not in buf.getvalue()  # nothing cut off: long cells wrap
        assert all(sum("fairseq/encoder" in line for line in lines) == 3 for _ in [0])
        assert all(any(p in line for line in lines) for p in ("post-ln", "pre-ln", "residual"))


def test_the_sigterm_handler_is_only_installed_while_a_command_runs(tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    CliRunner().invoke(app, ["train", *TINY, "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert signal.getsignal(signal.SIGTERM) is before  # a process embedding the CLI keeps its own handler
