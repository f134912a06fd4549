"""Loading torch pickles (`.pt`, `.bin`) without running the code they may carry.

Checkpoints are untrusted: a pickle can name any importable callable (`os.system`) and have it
called on load. The default here is torch's own weights-only unpickler, which refuses every
global outside an allow-list of tensor-rebuilding functions. Pickles such as fairseq's also
hold harmless objects of other classes (argparse namespaces, OmegaConf configs, meters); each
such global is first found by scanning the pickle's opcodes, never imported, and replaced by an
`Inert` placeholder that only records its arguments and state. A planted `builtins.eval`
thus becomes an inert record; `os.system` and its kin are refused outright, as torch does. `trust=True` is the explicit opt-out: plain `torch.load`.
"""

from __future__ import annotations

import io
import pickletools
import sys
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import CheckpointError

BLOCKED_MODULES = ("sys", "os", "posix", "nt")  # torch refuses these even when allow-listed
LEGACY_PICKLES = 4  # legacy torch.save: magic number, protocol, sys info, then the object


class Inert:
    """Stands in for an unpickled object of a class that was not trusted: holds data, runs nothing."""

    qualified = "?"  # the global's "module.name" in the pickle

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualified}>"


def placeholder(qualified: str) -> type[Inert]:
    # The name comes from the file: a damaged one may hold a NUL, which no class name may.
    return type(f"Inert[{qualified.replace(chr(0), '?')}]", (Inert,), {"qualified": qualified})


def mapping(obj: Any) -> dict | None:
    """A dict view of a plain dict, or of an inert object whose state was a dict (a Namespace)."""
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, Inert):
        state = obj.state[0] if isinstance(obj.state, tuple) and obj.state else obj.state
        if isinstance(state, dict):
            return state
    return None


def pickle_globals(stream: BinaryIO, found: set[str] | None = None) -> set[str]:
    """Every "module.name" a pickle refers to (GLOBAL and STACK_GLOBAL), found without running it.

    Names are added to `found` as they are read, so a caller keeps those seen before a parse error.
    """
    found = set() if found is None else found
    strings, memo = [], {}
    with warnings.catch_warnings():  # a damaged STRING opcode makes pickletools warn about escapes
        warnings.simplefilter("ignore")
        _scan(stream, found, strings, memo)
    return found


def _scan(stream: BinaryIO, found: set[str], strings: list, memo: dict) -> None:
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name == "GLOBAL":
            module, attr = arg.split(" ", 1)
            # Python 2 names, mapped as pickle (and torch's unpickler) map them for protocol < 3.
            module, attr = NAME_MAPPING.get(
                (module, attr), (IMPORT_MAPPING.get(module, module), attr)
            )
            found.add(f"{module}.{attr}")
        elif name in (
            "SHORT_BINUNICODE",
            "BINUNICODE",
            "UNICODE",
            "BINUNICODE8",
            "SHORT_BINSTRING",
            "BINSTRING",
        ):
            strings.append(arg)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = strings[-1] if strings else None
        elif name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            if isinstance(memo.get(arg), str):
                strings.append(memo[arg])
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")


def checkpoint_globals(path: Path, found: set[str] | None = None) -> set[str]:
    """Globals of a torch checkpoint: the zip format's data.pkl, or the legacy format's pickles
    (up to four in a row; a plain pickle is one). Accumulated into `found` as they are read."""
    found = set() if found is None else found
    with open(path, "rb") as fh:
        if zipfile.is_zipfile(fh):
            fh.seek(0)
            with zipfile.ZipFile(fh) as zf:
                pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not pkl:
                    raise CheckpointError(
                        f"{path}: a zip file but not a PyTorch checkpoint (no data.pkl)"
                    )
                return pickle_globals(io.BytesIO(zf.read(pkl[0])), found)
        fh.seek(0)
        for _ in range(LEGACY_PICKLES):
            pickle_globals(fh, found)
            if not fh.peek(1)[:1]:  # end of file: a plain pickle, or a legacy file's last record
                break
        return found


def blocked_globals(names: set[str]) -> list[str]:
    """The globals of `names` that would run code on loading (os.system and its kin)."""
    return sorted(n for n in names if n.split(".")[0] in BLOCKED_MODULES)


def unsafe_message(path, blocked: list[str]) -> str:
    return (
        f"{path}: refusing to load: the pickle calls {blocked[0]}, which would run code on loading "
        "(an unsafe pickle; nothing was run)"
    )


def _torch_allowed() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:  # private API gone: leave every torch.* name to torch's own checks
        return {"collections.OrderedDict"}
    return set(_get_allowed_globals())


def one_line(exc: BaseException) -> str:
    """An exception's message on one line of at most 160 characters, for a CheckpointError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def check_pickle(p: Path) -> set[str]:
    """The globals of the pickle file `p`, read without running it; a CheckpointError for an empty,
    corrupt or unsafe file. A payload seen before damage is named: unsafe, not merely corrupt."""
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file")
    names: set[str] = set()
    try:
        checkpoint_globals(p, names)
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        if blocked_globals(names):
            raise CheckpointError(unsafe_message(p, blocked_globals(names))) from None
        raise CheckpointError(
            f"{p}: not a PyTorch checkpoint or corrupt ({one_line(exc)})"
        ) from None
    blocked = blocked_globals(names)
    if blocked:
        raise CheckpointError(unsafe_message(p, blocked))
    return names


def load_pickle(path: str | Path, trust: bool = False, mmap: bool = False) -> Any:
    """Load a torch pickle on CPU; untrusted classes become `Inert` placeholders unless `trust`.

    `mmap` maps a zip-format file's tensors instead of reading them (the legacy format cannot be
    mapped): for reading the names in a large file without holding its weights in memory.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if trust:
        if p.stat().st_size == 0:
            raise CheckpointError(f"{p}: empty file")
        print(f"warning: --trust-pickle: unpickling {p} may run code it contains", file=sys.stderr)
        try:
            return torch.load(p, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{p}: cannot unpickle ({one_line(exc)})") from None
    names = check_pickle(p)
    allowed = _torch_allowed()
    stand_ins = [
        (placeholder(n), n)
        for n in sorted(names)
        if n not in allowed and not n.startswith("torch.")
    ]
    try:
        with torch.serialization.safe_globals(stand_ins), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(
                p, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(p)
            )
    except Exception as exc:
        raise CheckpointError(
            f"{p}: not a PyTorch checkpoint or corrupt ({one_line(exc)})"
        ) from None
