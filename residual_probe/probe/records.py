"""Probe records: tidy rows, a sink that appends them to CSV or JSONL as they come, and its reader.

A row is one number: {step, stack, layer, sublayer, stream, metric, value};
`pandas.DataFrame(probe.rows())` holds them. A sink is compact CSV (a line per step, stack and
layer, a column per metric/sublayer/stream: `pandas.read_csv(sink)`) or tidy JSONL
(`pandas.read_json(sink, lines=True)`); `read_sink(path).frame()` gives tidy rows from either
and from the tidy CSV of earlier versions. The sink writes whole lines and flushes after every
step, so a run that dies at step 900 leaves steps before it on disk; NaN and inf are written
as nan/inf (CSV) or NaN/Infinity (JSONL, as Python's json module reads them).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from .errors import ProbeError

COLUMNS = ("step", "stack", "layer", "sublayer", "stream", "metric", "value")  # a tidy row
WIDE_KEYS = ("step", "stack", "layer")  # a wide CSV line's key columns


def row(
    step: int, stack: str, layer: int, sublayer: str, stream: str, metric: str, value: float
) -> dict[str, Any]:
    return {
        "step": step,
        "stack": stack,
        "layer": layer,
        "sublayer": sublayer,
        "stream": stream,
        "metric": metric,
        "value": value,
    }


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return (
            repr(v)
            if math.isfinite(v)
            else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
        )
    return v


class RowSink:
    """Appends rows to `path` (.csv or .jsonl); `{rank}` in the path is replaced by the process rank.

    A .csv sink is wide: one line per (step, stack, layer), a column per `metric/sublayer/stream`,
    values to 7 significant digits (relative error at most 5e-7, float32's own resolution;
    about 12 bytes a number instead of a 60-byte tidy row: under 250 bytes per block per
    recorded step at the default quantities with one stream, 300 with ResiDual's two). A key first seen
    after the header was written adds a column at the end: the header line is rewritten once
    (atomically) and the earlier, shorter lines stay valid. A .jsonl sink is tidy, a JSON row
    per number (larger; every value at full precision). An existing tidy CSV (older versions)
    is continued in its own layout.

    The file is appended to, never truncated: a probe re-entered (`with probe:` twice) or a run
    resumed with `start_step` continues it.
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0):
        self.path = Path(str(path).replace("{rank}", str(rank)))
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".jsonl", ".ndjson"):
            raise ProbeError(f"sink {str(self.path)!r}: use a .csv or .jsonl file name")
        self.format = "csv" if suffix == ".csv" else "jsonl"
        parent = self.path.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ProbeError(
                f"sink {str(self.path)!r}: folder {str(parent)!r} does not exist or is not writable"
            )
        if self.path.is_dir():
            raise ProbeError(f"sink {str(self.path)!r} is a folder")
        self._fh = None
        self._columns: dict[str, int] | None = None  # wide CSV: key column -> position

    def _open(self) -> None:
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh and self.format == "csv":
            with open(self.path, encoding="utf-8", newline="") as fh:
                header = next(csv.reader([fh.readline()]), [])
            if tuple(header) == COLUMNS:
                self.format = "tidy-csv"
            elif tuple(header[:3]) == WIDE_KEYS and all(_split_key(c) for c in header[3:]):
                self._columns = {c: i for i, c in enumerate(header)}
            else:
                raise ProbeError(
                    f"sink {str(self.path)!r} exists and is not a probe CSV (first line "
                    f"{','.join(header)[:60]!r}); rows are appended, never overwritten: choose another file"
                )
        self._fh = open(self.path, "a", encoding="utf-8", newline="")
        from ..ownership import record_write

        record_write(self.path)  # a command's own folder lists its sink from the first line

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        if self._fh is None:
            self._open()
        if self.format == "jsonl":
            self._fh.writelines(json.dumps(r) + "\n" for r in rows)
        elif self.format == "tidy-csv":
            csv.writer(self._fh, lineterminator="\n").writerows(
                [_csv_value(r[c]) for c in COLUMNS] for r in rows
            )
        else:
            self._write_wide(rows)
        self._fh.flush()

    def _write_wide(self, rows: Iterable[dict[str, Any]]) -> None:
        lines: dict[tuple, dict[str, float]] = {}
        for r in rows:
            key = f"{r['metric']}/{r['sublayer']}/{r['stream']}"
            lines.setdefault((r["step"], r["stack"], r["layer"]), {})[key] = r["value"]
        new = list(
            dict.fromkeys(
                k for cells in lines.values() for k in cells if k not in (self._columns or {})
            )
        )
        if self._columns is None or new:
            self._extend_header(new)
        width = len(self._columns)
        out = []
        for (step, stack, layer), cells in lines.items():
            line = [""] * width
            line[0], line[1], line[2] = step, stack, layer
            for k, v in cells.items():
                line[self._columns[k]] = _short(v)
            out.append(line)
        csv.writer(self._fh, lineterminator="\n").writerows(out)

    def _extend_header(self, new: list[str]) -> None:
        """Header = WIDE_KEYS + key columns; new keys go at the end, so earlier lines stay valid."""
        columns = list(self._columns or WIDE_KEYS) + new
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(columns)
        if self.path.stat().st_size == 0:
            self._fh.write(buf.getvalue())
        else:  # rewrite the header line: copy the body behind the new header, then swap the files
            self._fh.close()
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                src.readline()
                dst.write(buf.getvalue().encode("utf-8"))
                shutil.copyfileobj(src, dst)
            os.replace(tmp, self.path)
            self._fh = open(self.path, "a", encoding="utf-8", newline="")
        self._columns = {c: i for i, c in enumerate(columns)}

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _short(v: Any) -> str:
    """A value of the wide CSV: 7 significant digits (float32's resolution), nan/inf as words."""
    v = float(v)
    if math.isfinite(v):
        return f"{v:.7g}"
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _split_key(column: str) -> tuple[str, str, str] | None:
    """`metric/sublayer/stream` -> its parts (a sublayer may hold "/"; metric and stream never do)."""
    metric, _, rest = column.partition("/")
    sublayer, _, stream = rest.rpartition("/")
    return (metric, sublayer, stream) if metric and sublayer and stream else None


# ---- reading a sink back -------------------------------------------------------------------

SINK_NAMES = ("probe.csv", "probe.jsonl", "probe.ndjson")
SUFFIXES = (".jsonl", ".ndjson", ".csv")


class SinkError(UserError):
    """Unusable probe sink (missing, empty, not a probe sink); one line for the user."""


@dataclass
class Sink:
    path: Path
    rows: list[dict]
    partial_line: bool = (
        False  # the last line was incomplete (a run still writing) and was left out
    )
    notes: list[str] = field(default_factory=list)

    def frame(self):
        """The rows as a tidy pandas DataFrame (columns COLUMNS)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(COLUMNS))


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
            raise SinkError(f"folder {str(p)!r} holds no probe sink (probe.csv or probe.jsonl)")
        raise SinkError(
            f"folder {str(p)!r} holds several possible sinks ({', '.join(q.name for q in found[:4])}); "
            "name the file"
        )
    if p.suffix.lower() not in SUFFIXES:
        raise SinkError(
            f"{str(p)!r} is not a probe sink: expected a .jsonl or .csv file, or a folder holding one"
        )
    return p


def _row(raw: dict, where: str) -> dict:
    try:
        return {
            "step": int(raw["step"]),
            "stack": str(raw["stack"]),
            "layer": int(raw["layer"]),
            "sublayer": str(raw["sublayer"]),
            "stream": str(raw["stream"]),
            "metric": str(raw["metric"]),
            "value": float(raw["value"]),
        }
    except (KeyError, TypeError, ValueError):
        raise SinkError(
            f"{where} is not a probe row (expected the columns {', '.join(COLUMNS)})"
        ) from None


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
        if tuple(header) == COLUMNS:
            for i, rec in enumerate(reader, start=2):
                if len(rec) != len(COLUMNS):
                    raise SinkError(
                        f"{str(path)!r} line {i} is not a probe row ({len(rec)} fields)"
                    )
                rows.append(_row(dict(zip(COLUMNS, rec)), f"{str(path)!r} line {i}"))
        else:
            keys = [_split_key(c) for c in header[3:]]
            if tuple(header[:3]) != WIDE_KEYS or not all(keys):
                raise SinkError(
                    f"{str(path)!r} is not a probe sink: its header is neither "
                    f"{','.join(COLUMNS)} nor {','.join(WIDE_KEYS)},metric/sublayer/stream,..."
                )
            for i, rec in enumerate(reader, start=2):
                if not 3 <= len(rec) <= len(header):
                    raise SinkError(
                        f"{str(path)!r} line {i} is not a probe line ({len(rec)} fields, header {len(header)})"
                    )
                where = f"{str(path)!r} line {i}"
                for (metric, sublayer, stream), cell in zip(keys, rec[3:]):
                    if cell != "":  # empty: not recorded at this step
                        rows.append(
                            _row(
                                dict(
                                    step=rec[0],
                                    stack=rec[1],
                                    layer=rec[2],
                                    sublayer=sublayer,
                                    stream=stream,
                                    metric=metric,
                                    value=cell,
                                ),
                                where,
                            )
                        )
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
