"""Writing outputs: the one atomic writer, tidy tables, the JSON sidecar.

A file appears whole or not at all: `write_atomic` writes to a temporary file beside the
target, gives it `FILE_MODE`, then renames it over the target, so an error or an interrupt
never leaves a half-written result. Every artifact of the package goes through it: tables,
JSON sidecars, figures (`plots.style.save`) and model weights (`checkpoints`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

from .errors import UserError

Content = Union[str, bytes, Callable[[Path], None]]


class OutputError(UserError):
    """The output location cannot be used; the message is one line meant for the user."""


def prepare_out(out: str | Path) -> Path:
    """Create the output folder and check it is writable, before any work is done."""
    p = Path(out)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {str(p)!r}: {exc.strerror or exc}") from None
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The mode open() would give (0644 under the usual umask 022), for every file written here:
# mkstemp's own 0600 would hide results (and model weights) from the user's group.
FILE_MODE = 0o666 & ~_umask()


def write_atomic(path: str | Path, content: Content) -> Path:
    """Write `content` to `path` atomically with FILE_MODE; returns `path`.

    content: text (UTF-8), bytes, or a callable `write(tmp_path)` that writes the file itself
    (matplotlib's savefig, safetensors' save_file).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    try:
        if callable(content):
            os.close(fd)
            content(Path(tmp))
        else:
            data = content.encode("utf-8") if isinstance(content, str) else content
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
        raise
    return path


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> Path:
    """A tidy table (one row per observation) as CSV: exactly `columns`, floats round-trip exactly
    (repr), non-finite values as nan / inf / -inf."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    return write_atomic(path, buf.getvalue())


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    return v


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str, allow_nan=True) + "\n")


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on, for the JSON sidecar."""
    import numpy
    import torch

    from . import __version__

    return {
        "residual_probe": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }
