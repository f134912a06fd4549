"""A command owns its output folder: a manifest of what it wrote, a lock while it writes.

Two failures this prevents: stale files of an earlier run read as part of a new one (a report
embedding another model's figure), and two runs writing one folder at once (a complete-looking
mix). While a command runs, OUT/.lock holds its PID, host and command (created exclusively, so a
second run into the same folder stops at once, naming the first), and OUT/.residual-probe.json
(the manifest) lists every file it has written so far with the run's status:

- "running": being written (or the process died: readers check the PID and say "interrupted");
- "complete": the command finished;
- "partial": the command failed or was interrupted; the files listed are whole (each file is
  written atomically) but the set is not.

A folder whose manifest comes from another run is refused unless `overwrite`, which first
removes the files that manifest lists (and nothing else: files the toolkit did not write stay).
Folders without a manifest are used as they are: ownership is recognized, never guessed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

from .errors import UserError

MANIFEST = ".residual-probe.json"
LOCK = ".lock"
_active: list["Owned"] = []  # the folders owned by the running command (innermost last)


class FolderError(UserError):
    """The output folder is in use or holds another run's outputs; one line for the user."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _alive(pid: int, host: str) -> bool:
    """Whether the process `pid` on `host` may still run (another host: assume it does)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # killed but not yet reaped by its parent (a zombie, state Z): gone all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest, or None (none, or unreadable: then it is not ours to trust)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "status" in data else None


def _pid(manifest: dict) -> int:
    try:
        return int(manifest.get("pid", 0))
    except (TypeError, ValueError):
        return 0


def run_status(manifest: dict) -> str:
    """The manifest's status as a reader should say it: a "running" run whose process is gone on
    this host (kill -9, a power cut) is "interrupted (pid N is gone)"."""
    status = str(manifest.get("status", "?"))
    if status == "running" and not _alive(_pid(manifest), str(manifest.get("host", ""))):
        return f"interrupted (pid {_pid(manifest)} is gone)"
    return status


def folder_state(folder: str | Path) -> str | None:
    """What a reader should say of a folder: None when its run completed (or it has no manifest),
    else one line ("partial: ..." / "interrupted: ..." / "being written: ...")."""
    m = read_manifest(folder)
    if m is None or m["status"] == "complete":
        return None
    who = f"`{m.get('command', '?')}` (pid {m.get('pid')} on {m.get('host')}, started {m.get('started')})"
    if m["status"] == "running":
        if run_status(m) == "running":
            return f"being written by {who}: its files may change"
        return f"interrupted: {who} ended before finishing; its files are whole but the set is incomplete"
    return f"partial: {who} {m.get('reason', 'did not finish')}; its files are whole but the set is incomplete"


class Owned:
    """The running command's hold on one output folder (see the module docstring)."""

    def __init__(self, folder: Path, command: str):
        self.folder, self.command = folder, command
        self.files: list[str] = []
        self.meta = dict(
            command=command, pid=os.getpid(), host=socket.gethostname(), started=_now()
        )

    def record(self, path: Path) -> None:
        rel = os.path.relpath(Path(path).absolute(), self.folder.absolute())
        if rel not in self.files and rel not in (MANIFEST, LOCK):
            self.files.append(rel)
            self.write("running")

    def write(self, status: str, **extra) -> None:
        """Replace the manifest atomically; a full disk or a lost folder is a FolderError (one
        line) and leaves no temporary file behind."""
        data = dict(self.meta, status=status, files=self.files, **extra)
        tmp = self.folder / f".{MANIFEST}.tmp"
        try:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, self.folder / MANIFEST)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise FolderError(
                f"cannot write {str(self.folder / MANIFEST)!r}: {exc.strerror or exc}"
            ) from None


def record_write(path: str | Path) -> None:
    """Called by the atomic writer after each file: the owning run (if any) lists it."""
    p = Path(path).absolute()
    for owned in reversed(_active):
        if p.is_relative_to(owned.folder.absolute()):
            owned.record(p)
            return


def _take_lock(folder: Path, command: str) -> Path:
    lock = folder / LOCK
    info = json.dumps(
        dict(pid=os.getpid(), host=socket.gethostname(), command=command, started=_now())
    )
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text())
                pid, host = int(held["pid"]), str(held["host"])
            except (OSError, ValueError, KeyError, TypeError):
                held, pid, host = {}, 0, ""
            if held and _alive(pid, host):
                raise FolderError(
                    f"{str(folder)!r} is being written by another run (pid {pid} on {host}: "
                    f"`{held.get('command', '?')}`, since {held.get('started', '?')}); wait for it "
                    "or choose another --out"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone (or the lock is unreadable)
            continue
        except OSError as exc:
            raise FolderError(
                f"cannot write to output folder {str(folder)!r}: {exc.strerror or exc}"
            ) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(info + "\n")
        return lock
    raise FolderError(f"cannot lock output folder {str(folder)!r}: another run keeps taking it")


def _remove_earlier(folder: Path, manifest: dict) -> None:
    """Remove the files an earlier run's manifest lists (inside `folder` only), then its empty subfolders."""
    root = folder.resolve()
    parents = set()
    for rel in manifest.get("files", []):
        p = (folder / str(rel)).resolve()
        if p.is_relative_to(root) and p != root and p.is_file():
            p.unlink()
            parents.update(q for q in p.parents if q.is_relative_to(root) and q != root)
    for d in sorted(parents, key=lambda q: len(q.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty
    (folder / MANIFEST).unlink(missing_ok=True)


@contextlib.contextmanager
def owned_out(
    out: str | Path, command: str, overwrite: bool = False, update: bool = False
) -> Iterator[Path]:
    """Own `out` for the duration of a command: lock, refuse or clear another run's outputs, list
    every file written, mark the end complete or partial, release the lock.

    update=True accepts an earlier manifest of the same command and keeps its files (a command
    that updates its folder in place, as `figures --only`). A folder this call created and left
    without a file is removed again on failure.
    """
    folder = Path(out)
    top, p = None, folder.absolute()
    while not p.exists() and p != p.parent:
        top, p = p, p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FolderError(
            f"cannot write to output folder {str(folder)!r}: {exc.strerror or exc}"
        ) from None
    owned = None
    try:
        lock = _take_lock(folder, command)
        try:
            earlier = read_manifest(folder)
            owned = Owned(folder, command)
            if earlier is not None:
                same = update and earlier.get("command", "").split()[:2] == command.split()[:2]
                if same:
                    owned.files = [f for f in earlier.get("files", []) if (folder / f).is_file()]
                elif not overwrite:
                    raise FolderError(
                        f"{str(folder)!r} holds the outputs of another run (`{earlier.get('command', '?')}`, "
                        f"{run_status(earlier)}, {earlier.get('started', '?')}); pass --overwrite to replace them, "
                        "or choose another --out"
                    )
                else:
                    _remove_earlier(folder, earlier)
            owned.write("running")
            _active.append(owned)
            try:
                yield folder
            except BaseException as exc:
                if (
                    not owned.files
                ):  # nothing written (bad input, usually): leave no trace of this run
                    (folder / MANIFEST).unlink(missing_ok=True)
                    raise
                reason = (
                    "was interrupted"
                    if isinstance(exc, (KeyboardInterrupt, SystemExit))
                    else "failed"
                )
                # The first error is the one to report: when the manifest cannot be marked partial
                # either (the disk is full), it keeps "running" with this pid, which readers call
                # interrupted once the process is gone.
                with contextlib.suppress(FolderError):
                    owned.write(
                        "partial", reason=f"{reason} ({type(exc).__name__})", finished=_now()
                    )
                raise
            owned.write("complete", finished=_now())
        finally:
            if owned in _active:
                _active.remove(owned)
            lock.unlink(missing_ok=True)
    except BaseException:
        if (
            top is not None
            and top.is_dir()
            and not any(f.is_file() and f.name not in (MANIFEST, LOCK) for f in top.rglob("*"))
        ):
            shutil.rmtree(top, ignore_errors=True)
        raise
