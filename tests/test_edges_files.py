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


def test_divergence_is_one_line_and_in_train_json_and_no_library_warning(tmp_path):
    import csv
    import json
    import warnings

    out = tmp_path / "div"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["train", *TINY, "--batch", "2", "--seq-len", "16", "--steps", "30",
                                          "--lr", "1e6", "--eval-every", "50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("train ")]  # the progress bar
    assert len(lines) == 1 and lines[0].startswith("warning: training diverged: the loss became nan at step"), lines
    assert "Warning" not in result.output
    assert not [w for w in caught if "matplotlib" in w.filename or "numpy" in w.filename], [str(w.message) for w in caught]
    meta = json.loads((out / "train.json").read_text())
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert meta["diverged"]["step"] == meta["diverged_at_step"] == int(rows[-1]["step"])
    assert meta["steps_done"] == len(rows)  # what train.json says agrees with what loss.csv holds
    assert (out / "grad_heatmap.png").exists() and (out / "collapse.png").exists()  # the probe log's figures
