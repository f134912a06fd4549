"""A command owns its --out folder: stale outputs refused or replaced, concurrent runs refused,
an interrupted run marked partial and said so by readers; a sink cut mid-step is read without
its incomplete last step."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from residual_probe.cli import app
from residual_probe.output import write_atomic
from residual_probe.ownership import (
    LOCK,
    MANIFEST,
    FolderError,
    folder_state,
    owned_out,
    read_manifest,
)

runner = CliRunner()
TINY = "--depth 2 --d-model 16 --heads 2 --ffn 32 --batch 2 --seq-len 6 --seeds 1".split()


def grad_norms(out, *extra):
    return runner.invoke(app, ["grad-norms", *TINY, "--out", str(out), *extra])


def test_an_earlier_runs_folder_is_refused_then_replaced_with_overwrite(tmp_path):
    out = tmp_path / "gn"
    assert grad_norms(out, "--placements", "post-ln").exit_code == 0
    first = read_manifest(out)
    assert first["status"] == "complete" and "grad_norms.csv" in first["files"]
    (out / "mine.txt").write_text("the user's own notes")
    (out / "stale.png").write_text("x")  # not listed in a manifest: never touched
    r = grad_norms(out, "--placements", "pre-ln")
    assert (
        r.exit_code == 2
        and "holds the outputs of another run" in r.output
        and "--overwrite" in r.output
    )
    assert "Traceback" not in r.output
    assert read_manifest(out) == first  # the refused run changed nothing
    r = grad_norms(out, "--placements", "pre-ln", "--overwrite")
    assert r.exit_code == 0, r.output
    rows = (out / "grad_norms.csv").read_text()
    assert "pre-ln" in rows and "post-ln" not in rows
    assert (out / "mine.txt").read_text() == "the user's own notes" and (out / "stale.png").exists()
    assert read_manifest(out)["status"] == "complete" and not (out / LOCK).exists()


def test_a_second_concurrent_run_exits_2_naming_the_first(tmp_path):
    out = tmp_path / "busy"
    with owned_out(out, "residual-probe diagnose --ckpt a"):
        r = grad_norms(out)
        assert r.exit_code == 2, r.output
        assert f"pid {os.getpid()}" in r.output and "residual-probe diagnose --ckpt a" in r.output
        assert folder_state(out).startswith("being written")
    assert not (out / LOCK).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    import socket

    (out / LOCK).write_text(
        json.dumps(dict(pid=int(dead.stdout), host=socket.gethostname(), command="x"))
    )
    assert grad_norms(out).exit_code == 0


def test_a_crash_between_two_files_leaves_a_partial_folder_that_readers_name(tmp_path):
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError):
        with owned_out(out, "residual-probe train --out crash"):
            write_atomic(out / "probe.jsonl", '{"step": 0}\n')
            raise RuntimeError("killed between two files")
    m = read_manifest(out)
    assert m["status"] == "partial" and m["files"] == ["probe.jsonl"] and "failed" in m["reason"]
    assert folder_state(out).startswith("partial")
    # a process killed outright (no chance to mark itself): the manifest says running, its PID is gone
    code = (
        "import sys; from residual_probe.ownership import owned_out; from residual_probe.output import write_atomic\n"
        f"with owned_out({str(tmp_path / 'killed')!r}, 'residual-probe train'):\n"
        f"    write_atomic({str(tmp_path / 'killed' / 'a.csv')!r}, 'x\\n'); import os; os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert read_manifest(tmp_path / "killed")["status"] == "running"
    assert folder_state(tmp_path / "killed").startswith("interrupted")
    # a second run into the killed run's folder names it as interrupted, not running
    pid = read_manifest(tmp_path / "killed")["pid"]
    with pytest.raises(FolderError, match=rf"interrupted \(pid {pid} is gone\)"):
        with owned_out(tmp_path / "killed", "residual-probe train"):
            pass


def test_a_full_disk_is_one_line_and_leaves_no_temporary_manifest(tmp_path, monkeypatch):
    """The disk fills while results are written: the manifest cannot be marked partial either.
    The error stays the first one (exit 2, one line), no temporary file is left, and the
    manifest keeps "running" with this pid, which readers call interrupted once it is gone."""
    import errno
    import tempfile
    from pathlib import Path

    full = OSError(errno.ENOSPC, "No space left on device")
    mkstemp, write_text = tempfile.mkstemp, Path.write_text

    written = []

    def no_space_for_results(*args, dir=None, prefix="", **kw):
        written.append(prefix)
        if len(written) == 2:  # the first result is whole; the disk is full at the second
            monkeypatch.setattr(Path, "write_text", no_space_for_manifest)
            raise full
        return mkstemp(*args, dir=dir, prefix=prefix, **kw)

    def no_space_for_manifest(self, *args, **kw):
        if self.name == f".{MANIFEST}.tmp":
            write_text(self, "")  # the 0-byte file a full disk leaves
            raise full
        return write_text(self, *args, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", no_space_for_results)
    out = tmp_path / "full"
    r = grad_norms(out)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write"), r.output
    assert "internal error" not in r.output and not (out / f".{MANIFEST}.tmp").exists()
    m = read_manifest(out)
    assert m["status"] == "running" and m["pid"] == os.getpid() and not (out / LOCK).exists()


def test_bad_input_leaves_no_manifest_and_no_folder(tmp_path):
    out = tmp_path / "never"
    r = grad_norms(out, "--placements", "no-such")
    assert r.exit_code == 2 and not out.exists()
    out.mkdir()
    r = grad_norms(out, "--placements", "no-such")
    assert r.exit_code == 2 and not (out / MANIFEST).exists() and not (out / LOCK).exists()


def test_overwrite_removes_only_files_inside_the_folder(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    outside = tmp_path / "keep.txt"
    outside.write_text("keep")
    (out / MANIFEST).write_text(
        json.dumps(dict(status="complete", command="x", files=["../keep.txt", "a.txt"]))
    )
    (out / "a.txt").write_text("old")
    with owned_out(out, "residual-probe plot", overwrite=True):
        pass
    assert outside.read_text() == "keep" and not (out / "a.txt").exists()
    with pytest.raises(FolderError):
        with owned_out(out, "residual-probe plot"):
            pass


def test_a_killed_process_not_yet_reaped_counts_as_gone(tmp_path):
    """kill -9 leaves a zombie until its parent reaps it: its pid still answers kill(pid, 0)."""
    import signal
    import socket

    from residual_probe.ownership import _alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _alive(child.pid, socket.gethostname())
        os.kill(child.pid, signal.SIGKILL)
        for _ in range(200):  # not reaped (no wait()): a zombie once the kill has landed
            state = open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            __import__("time").sleep(0.01)
        assert state == "Z" and not _alive(child.pid, socket.gethostname())
    finally:
        child.kill()
        child.wait()
