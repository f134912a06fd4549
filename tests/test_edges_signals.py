"""SIGTERM (a cluster's preemption) is handled like Ctrl-C (SIGINT) by every long command: the job
stops, keeps what an interrupt keeps, prints one `error:` line and exits 143 (SIGTERM) or 130.

Each case starts the real CLI in a subprocess with small sizes, waits until the command is at work
(torch loaded, which happens inside the command, after the handler is installed; for `train`, until
loss.csv has rows), sends the signal once, and checks the exit status and the files left behind.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "16", "--heads", "2", "--ffn", "32"]
CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
WORDS = {signal.SIGTERM: "terminated (SIGTERM)", signal.SIGINT: "interrupted"}

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="readiness read from /proc"
)


def torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def loss_rows(out: Path) -> int:
    try:
        return max(0, len((out / "loss.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def default_sigint() -> None:
    """In the child: SIGINT at its default, as in a terminal. A suite started in the background by a
    non-interactive shell (`make test &`, nohup) inherits SIGINT ignored, and Python then keeps it
    ignored: the command would rightly not see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_and_signal(args: list[str], sig, ready, tmp_path: Path, settle: float = 0.0):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "residual_probe.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    deadline = time.monotonic() + 240
    while not ready(proc.pid):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"finished before the signal (rc {proc.returncode}): {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("never became ready")
        time.sleep(0.05)
    time.sleep(settle)
    proc.send_signal(sig)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("did not stop within 120 s of the signal")
    return proc.returncode, stdout, stderr


def check_stop(rc, stderr, sig, out: Path):
    assert rc == CODES[sig], stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and WORDS[sig] in lines[-1], stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert (
        not [p for p in out.rglob("*") if p.name.endswith(".tmp")] if out.exists() else True
    )  # nothing half-written


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_train_keeps_what_an_interrupt_keeps(tmp_path, sig):
    out = tmp_path / "train"
    rc, _, stderr = run_and_signal(
        [
            "train",
            "--depth",
            "2",
            *TINY,
            "--batch",
            "2",
            "--seq-len",
            "16",
            "--steps",
            "100000",
            "--probe-every",
            "1",
            "--eval-every",
            "1000",
            "--out",
            str(out),
        ],
        sig,
        lambda pid: loss_rows(out) >= 3,
        tmp_path,
    )
    check_stop(rc, stderr, sig, out)
    meta = json.loads((out / "train.json").read_text())
    assert meta["interrupted"] is True
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert len(rows) >= 3 and meta["steps_done"] == len(rows)  # train.json agrees with loss.csv
    assert meta["model_updates"] in (len(rows), len(rows) + 1)
    assert (out / "model" / "model.safetensors").stat().st_size > 0 and (out / "loss.png").exists()
    from residual_probe.checkpoints import load_model

    assert load_model(out / "model").cfg.depth == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_grad_norms_with_steps_stops_cleanly(tmp_path, sig):
    out = tmp_path / "gn"
    rc, _, stderr = run_and_signal(
        [
            "grad-norms",
            "--depth",
            "2",
            *TINY,
            "--seeds",
            "1",
            "--batch",
            "2",
            "--seq-len",
            "8",
            "--steps",
            "100000",
            "--out",
            str(out),
        ],
        sig,
        torch_loaded,
        tmp_path,
        settle=1.5,
    )
    check_stop(rc, stderr, sig, out)
    assert not (
        out / "grad_norms.json"
    ).exists()  # an interrupted grad-norms writes no partial results


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_bounds_stops_cleanly(tmp_path, sig):
    out = tmp_path / "bounds"
    rc, _, stderr = run_and_signal(
        [
            "bounds",
            "--depth",
            "96",
            *TINY,
            "--seeds",
            "3",
            "--batch",
            "2",
            "--seq-len",
            "8",
            "--out",
            str(out),
        ],
        sig,
        torch_loaded,
        tmp_path,
        settle=1.5,
    )
    check_stop(rc, stderr, sig, out)
    assert not (out / "bounds.json").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from residual_probe.checkpoints import save_model
    from residual_probe.models import ModelConfig, Transformer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(
        Transformer(
            ModelConfig(arch="decoder", placement="pre-ln", depth=2, d_model=16, heads=2, ffn=32)
        ),
        path,
    )
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_collapse_stops_cleanly(tmp_path, sig, tiny_checkpoint):
    out = tmp_path / "collapse"
    rc, _, stderr = run_and_signal(
        [
            "collapse",
            "--ckpt",
            str(tiny_checkpoint),
            "--tokens",
            "4000000",
            "--seq-len",
            "64",
            "--batch",
            "2",
            "--out",
            str(out),
        ],
        sig,
        torch_loaded,
        tmp_path,
        settle=1.5,
    )
    check_stop(rc, stderr, sig, out)
    assert not (out / "collapse.json").exists()
