"""Writing results: tidy CSV rows and a JSON sidecar, each written atomically.

A file appears whole or not at all (write to a temporary file beside it, then rename), so an
error or an interrupt never leaves a half-written result.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence


class OutputError(OSError):
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


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide results from others


def write_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> Path:
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
