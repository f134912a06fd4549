"""A small, strict reader and writer for the safetensors format, in plain torch.

Why not the `safetensors` package: it is an optional extra, and the native format must load
without it. Why strict: checkpoints are untrusted, so every header field is checked (dtype,
shape, offsets inside the file, no overlaps) and a bad file gives one clear CheckpointError
instead of a crash or a silent misread. Format: 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import torch

from ..output import write_atomic
from .errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # bytes; the reference implementation's limit


def is_safetensors(path: str | Path) -> bool:
    """Cheap sniff: a plausible header length followed by '{'."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return 0 < n <= MAX_HEADER and head[8:9] == b"{"


def read_header(path: str | Path) -> tuple[dict, int, int]:
    """(header, data_start, file_size) after checking the header is a JSON object that fits."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(9)
            if len(head) < 9:
                raise CheckpointError(
                    f"{p}: not a safetensors file (only {size} bytes)"
                    if size
                    else f"{p}: empty file"
                )
            n = struct.unpack("<Q", head[:8])[0]
            if (
                head[8:9] != b"{" or n == 0 or n > MAX_HEADER
            ):  # the header is a JSON object right after its length
                raise CheckpointError(
                    f"{p}: not a safetensors file (no JSON header after the 8-byte length)"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{p}: truncated safetensors file (header length {n}, file {size} bytes)"
                )
            fh.seek(8)
            text = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{p}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: corrupt safetensors header (not an object)")
    return header, 8 + n, size


def load_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file (CPU, sharing one buffer) and its string metadata."""
    p = Path(path)
    header, start, size = read_header(p)
    meta = header.pop("__metadata__", None) or {}
    spans = []
    for name, info in header.items():
        spans.append((name, *_check_entry(p, name, info, size - start)))
    spans.sort(key=lambda s: s[3][0])
    for prev, cur in zip(spans, spans[1:]):
        if cur[3][0] < prev[3][1]:
            raise CheckpointError(
                f"{p}: corrupt safetensors file (tensors {prev[0]!r} and {cur[0]!r} overlap)"
            )
    buf = bytearray(size - start)
    try:
        with open(p, "rb") as fh:
            fh.seek(start)
            got = fh.readinto(buf)
    except OSError as exc:
        raise CheckpointError(f"cannot read {p}: {exc.strerror or exc}") from None
    if got != len(buf):
        raise CheckpointError(f"{p}: truncated safetensors file")
    if sys.byteorder != "little":
        raise CheckpointError("reading safetensors needs a little-endian machine")
    out = {}
    for name, dtype, shape, (s, _e) in spans:
        numel = math.prod(shape)
        t = (
            torch.frombuffer(buf, dtype=dtype, count=numel, offset=s)
            if numel
            else torch.empty(0, dtype=dtype)
        )
        out[name] = t.reshape(shape)
    return out, {str(k): str(v) for k, v in meta.items()}


def _check_entry(p: Path, name: str, info, data_len: int):
    bad = f"{p}: corrupt safetensors entry {name!r}"
    if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
        raise CheckpointError(
            f"{bad} (unknown dtype {info.get('dtype') if isinstance(info, dict) else info!r})"
        )
    shape, offs = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{bad} (bad shape)")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
        raise CheckpointError(f"{bad} (bad data_offsets)")
    dtype = DTYPES[info["dtype"]]
    s, e = offs
    if not 0 <= s <= e <= data_len:
        raise CheckpointError(
            f"{p}: truncated or corrupt safetensors file (entry {name!r} ends past the data)"
        )
    if e - s != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{bad} (size does not match shape {shape})")
    return dtype, shape, (s, e)


def save_file(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors atomically (output.write_atomic); shared storage must be deduplicated first."""
    header: dict = {"__metadata__": dict(metadata or {})}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in CODES:
            raise CheckpointError(f"cannot save tensor {name!r} of dtype {t.dtype} as safetensors")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # align the data to 8 bytes, as the reference writer does

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(text)))
            fh.write(text)
            for blob in blobs:
                fh.write(blob)

    return write_atomic(path, write)
