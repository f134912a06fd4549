"""Writing outputs: the one atomic writer, tidy tables, the JSON sidecar.

A file appears whole or not at all: `write_atomic` writes to a temporary file beside the
target, gives it `FILE_MODE`, then renames it over the target, so an error or an interrupt
never leaves a half-written result. Every artifact of the package goes through it: tables,
JSON sidecars, figures (`plots.style.save`) and model weights (`checkpoints`).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Union

from .errors import UserError
from .ownership import record_write

if TYPE_CHECKING:
    import pandas as pd

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
        raise OutputError(
            f"cannot write to output folder {str(p)!r}: {exc.strerror or exc}"
        ) from None
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
        record_write(path)  # the command that owns the folder lists the file in its manifest
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
        raise
    return path


def write_csv(
    path: str | Path,
    rows: "Iterable[dict[str, Any]] | pd.DataFrame",
    columns: Sequence[str] | None = None,
) -> Path:
    """The one tidy-table writer: a pandas DataFrame (or dict rows) as CSV, atomically.

    columns: the columns in order (default: the DataFrame's, or the first row's keys); a row
    with another key is a bug and raises. Floats are written to round-trip exactly (repr),
    missing and non-finite values as nan / inf / -inf; dict rows keep their Python types
    (an int column with a gap stays int, not float).
    """
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        df = rows if columns is None else rows[list(columns)]
    else:
        rows = list(rows)
        columns = list(columns if columns is not None else (rows[0] if rows else []))
        extra = {k for r in rows for k in r} - set(columns)
        if extra:
            raise ValueError(f"rows have columns outside {columns}: {sorted(extra)}")
        df = pd.DataFrame(rows, columns=columns, dtype=object)
    return write_atomic(path, df.to_csv(index=False, na_rep="nan", lineterminator="\n"))


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    return write_atomic(
        path, json.dumps(data, indent=2, sort_keys=True, default=str, allow_nan=True) + "\n"
    )


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on, for the JSON sidecar."""
    import numpy
    import torch

    from . import __version__

    return {
        "residual_probe": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
