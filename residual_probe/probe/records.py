"""Probe records: tidy rows, a sink that appends them to CSV or JSONL as they come, and its reader.

A row is one number: {step, stack, layer, sublayer, stream, metric, value}. `pandas.DataFrame(
probe.rows())`, `pandas.read_csv(sink)` and `pandas.read_json(sink, lines=True)` load them as
they are. The sink writes whole lines and flushes after every step, so a run that dies at step
900 leaves steps before it on disk; NaN and inf are written as nan/inf (CSV) or NaN/Infinity
(JSONL, as Python's json module reads them).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
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
            from ..ownership import record_write

            record_write(self.path)  # a command's own folder lists its sink from the first line
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


# ---- reading a sink back -------------------------------------------------------------------

SINK_NAMES = ("probe.jsonl", "probe.csv", "probe.ndjson")
SUFFIXES = (".jsonl", ".ndjson", ".csv")
class SinkError(UserError):
    """Unusable probe sink (missing, empty, not a probe sink); one line for the user."""


@dataclass
class Sink:
    path: Path
    rows: list[dict]
    partial_line: bool = False  # the last line was incomplete (a run still writing) and was left out
    notes: list[str] = field(default_factory=list)


def find_sink(run: str | Path) -> Path:
    p = Path(run)
    if not p.exists():
        raise SinkError(f"{str(p)!r} does not exist")
    if p.is_dir():
        for name in SINK_NAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SUFFIXES)
        if len(found) == 1:
            return found[0]
        if not found:
            raise SinkError(f"folder {str(p)!r} holds no probe sink (probe.jsonl or probe.csv)")
        raise SinkError(f"folder {str(p)!r} holds several possible sinks ({', '.join(q.name for q in found[:4])}); "
                        "name the file")
    if p.suffix.lower() not in SUFFIXES:
        raise SinkError(f"{str(p)!r} is not a probe sink: expected a .jsonl or .csv file, or a folder holding one")
    return p


def _row(raw: dict, where: str) -> dict:
    try:
        return {"step": int(raw["step"]), "stack": str(raw["stack"]), "layer": int(raw["layer"]),
                "sublayer": str(raw["sublayer"]), "stream": str(raw["stream"]), "metric": str(raw["metric"]),
                "value": float(raw["value"])}
    except (KeyError, TypeError, ValueError):
        raise SinkError(f"{where} is not a probe row (expected the columns {', '.join(COLUMNS)})") from None


def read_sink(run: str | Path) -> Sink:
    """The rows of a sink, up to its last complete line. Raises SinkError for unusable input."""
    path = find_sink(run)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SinkError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    partial = bool(data) and not data.endswith(b"\n")
    if partial:  # a writer is mid-line: keep only complete lines
        data = data[: data.rfind(b"\n") + 1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SinkError(f"{str(path)!r} is not a probe sink (not UTF-8 text)") from None
    rows = []
    if path.suffix.lower() == ".csv":
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            raise SinkError(f"{str(path)!r} is empty: no probe rows recorded yet")
        if tuple(header) != COLUMNS:
            raise SinkError(f"{str(path)!r} is not a probe sink: its header is not {','.join(COLUMNS)}")
        for i, rec in enumerate(reader, start=2):
            if len(rec) != len(COLUMNS):
                raise SinkError(f"{str(path)!r} line {i} is not a probe row ({len(rec)} fields)")
            rows.append(_row(dict(zip(COLUMNS, rec)), f"{str(path)!r} line {i}"))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                raise SinkError(f"{str(path)!r} line {i} is not JSON: not a probe sink") from None
            if not isinstance(raw, dict):
                raise SinkError(f"{str(path)!r} line {i} is not a probe row")
            rows.append(_row(raw, f"{str(path)!r} line {i}"))
    if not rows:
        raise SinkError(f"{str(path)!r} is empty: no probe rows recorded yet")
    return complete_rows(Sink(path, rows, partial))


def incomplete_last_step(rows: list[dict]) -> int | None:
    """The last step when it was cut mid-write, else None.

    A step's rows are written in one flush, but a reader can see a file cut inside it (a run
    killed mid-write, or read while writing). The last step is incomplete when a metric it
    has covers fewer (stack, layer, sublayer, stream) than at that metric's previous recorded
    step, or when it lacks a metric recorded at every earlier step. A metric never seen
    before cannot be checked and is trusted.
    """
    steps = sorted({r["step"] for r in rows})
    if len(steps) < 2:
        return None
    keys: dict[int, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        keys[r["step"]][r["metric"]].add((r["stack"], r["layer"], r["sublayer"], r["stream"]))
    last, earlier = steps[-1], steps[:-1]
    for metric in {m for s in earlier for m in keys[s]}:
        seen = [s for s in earlier if metric in keys[s]]
        if metric in keys[last]:
            if keys[last][metric] < keys[seen[-1]][metric]:
                return last
        elif len(seen) == len(earlier) and metric != "nonfinite_count":
            return last
    return None


def complete_rows(sink: Sink) -> Sink:
    """The sink without an incomplete last step (see `incomplete_last_step`), with a note saying so."""
    cut = incomplete_last_step(sink.rows)
    if cut is None:
        return sink
    rows = [r for r in sink.rows if r["step"] != cut]
    n = len(sink.rows) - len(rows)
    note = f"step {cut} is incomplete ({n} rows: cut mid-write) and was left out; the last complete step is {rows[-1]['step']}"
    return Sink(sink.path, rows, sink.partial_line, [*sink.notes, note])
