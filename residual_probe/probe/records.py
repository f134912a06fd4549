"""Probe records: tidy rows, and a sink that appends them to CSV or JSONL as they come.

A row is one number: {step, stack, layer, sublayer, stream, metric, value}. `pandas.DataFrame(
probe.rows())`, `pandas.read_csv(sink)` and `pandas.read_json(sink, lines=True)` load them as
they are. The sink writes whole lines and flushes after every step, so a run that dies at step
900 leaves steps before it on disk; NaN and inf are written as nan/inf (CSV) or NaN/Infinity
(JSONL, as Python's json module reads them).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from .schedule import ProbeError

COLUMNS = ("step", "stack", "layer", "sublayer", "stream", "metric", "value")


def row(step: int, stack: str, layer: int, sublayer: str, stream: str, metric: str, value: float) -> dict[str, Any]:
    return {"step": step, "stack": stack, "layer": layer, "sublayer": sublayer, "stream": stream,
            "metric": metric, "value": value}


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    return v


class RowSink:
    """Appends rows to `path` (.csv or .jsonl); `{rank}` in the path is replaced by the process rank.

    The file is appended to, never truncated: a probe re-entered (`with probe:` twice) or a run
    resumed with `start_step` continues it. A CSV header is written only into an empty file.
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0):
        self.path = Path(str(path).replace("{rank}", str(rank)))
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".jsonl", ".ndjson"):
            raise ProbeError(f"sink {str(self.path)!r}: use a .csv or .jsonl file name")
        self.format = "csv" if suffix == ".csv" else "jsonl"
        parent = self.path.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ProbeError(f"sink {str(self.path)!r}: folder {str(parent)!r} does not exist or is not writable")
        if self.path.is_dir():
            raise ProbeError(f"sink {str(self.path)!r} is a folder")
        self._fh = None
        self._writer = None

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        if self._fh is None:
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            if not fresh and self.format == "csv":
                with open(self.path, encoding="utf-8") as fh:
                    head = fh.readline().strip()
                if head != ",".join(COLUMNS):
                    raise ProbeError(f"sink {str(self.path)!r} exists and is not a probe CSV (first line {head[:60]!r}); "
                                     "rows are appended, never overwritten: choose another file")
            self._fh = open(self.path, "a", encoding="utf-8", newline="")
            if self.format == "csv":
                self._writer = csv.writer(self._fh, lineterminator="\n")
                if fresh:
                    self._writer.writerow(COLUMNS)
        if self.format == "csv":
            self._writer.writerows([_csv_value(r[c]) for c in COLUMNS] for r in rows)
        else:
            self._fh.writelines(json.dumps(r) + "\n" for r in rows)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._writer = None
