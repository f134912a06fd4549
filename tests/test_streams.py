"""One rule for what a command prints, tested over every command: results and verdicts on stdout
(so `residual-probe COMMAND > out.txt` holds only them); progress, notes, warnings and `wrote`
lines on stderr. Also: a run's manifest records a re-runnable command line, and `plot` writes
into the run's own folder by default, so plotting a second run needs no --out."""

import re
import shlex

import pytest
from typer.testing import CliRunner

from residual_probe.cli import app
from residual_probe.ownership import read_manifest

runner = CliRunner()
MODEL = ["--depth", "2", "--d-model", "16", "--heads", "2", "--ffn", "32"]
NOT_A_RESULT = re.compile(r"^\s*(note:|warning:|wrote |memory:|== )")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every command once, on a tiny model (train's checkpoint feeds the checkpoint commands)."""
    base = tmp_path_factory.mktemp("streams")
    train = base / "train"
    batch = ["--batch", "2", "--seq-len", "8"]
    ckpt = ["--ckpt", str(train / "model"), "--tokens", "100", "--seq-len", "16"]
    commands = {
        "train": [
            "train",
            *MODEL,
            *batch,
            "--steps",
            "4",
            "--probe-every",
            "1",
            "--eval-every",
            "2",
        ],
        "grad-norms": ["grad-norms", *MODEL, *batch, "--seeds", "1"],
        "bounds": ["bounds", *MODEL, "--depth", "2,4", "--seeds", "1", "--batch", "2"],
        "grad-norms --ckpt": ["grad-norms", *ckpt],
        "collapse": ["collapse", *ckpt],  # --tokens 100 is rounded down: a note
        "diagnose": ["diagnose", *ckpt],
        "plot": ["plot", str(train)],
        "figures": ["figures", "--quick", "--only", "instability"],
    }
    out = {}
    for name, args in commands.items():
        if name != "plot":
            args = [*args, "--out", str(base / name.replace(" ", ""))]
        out[name] = runner.invoke(app, args)
    return base, out


@pytest.mark.parametrize(
    "name",
    [
        "train",
        "grad-norms",
        "bounds",
        "grad-norms --ckpt",
        "collapse",
        "diagnose",
        "plot",
        "figures",
    ],
)
def test_stdout_holds_results_only(runs, name):
    r = runs[1][name]
    assert r.exit_code == 0, r.output
    assert r.stdout.strip(), f"{name} printed no result"
    leaked = [line for line in r.stdout.splitlines() if NOT_A_RESULT.match(line)]
    assert not leaked, f"{name}: on stdout: {leaked}"
    assert any(line.startswith("wrote ") for line in r.stderr.splitlines()) or name == "figures"


def test_the_rounding_note_and_the_memory_estimate_are_on_stderr(runs):
    out = runs[1]
    assert "note: --tokens" in out["collapse"].stderr
    assert "memory: " in out["train"].stderr and "memory: " not in out["train"].stdout


def test_plot_writes_into_the_run_and_records_a_rerunnable_command(runs, tmp_path):
    base, out = runs
    train = base / "train"
    command = read_manifest(train / "plots")["command"]
    assert command == f"residual-probe plot {shlex.quote(str(train))}", command
    assert "--run" not in command and " run " not in command
    # a second run's plot needs no --out: each run gets its own plots/ folder
    second = tmp_path / "second"
    second.mkdir()
    (second / "probe.csv").write_bytes((train / "probe.csv").read_bytes())
    r = runner.invoke(app, ["plot", str(second / "probe.csv")])
    assert r.exit_code == 0, r.output
    assert (second / "plots" / "grad_heatmap.png").is_file()


def test_loss_help_names_every_loss():
    r = runner.invoke(app, ["diagnose", "--help"], terminal_width=200)
    assert "contrastive" in r.stdout
