"""Fuzz pass over the checkpoint loaders: truncated, bit-flipped, spliced and random-byte files of every
format end in the documented `CheckpointError` (one line) or load; never another exception, a hang,
or code execution.

Formats: residual-probe's folder (config.json + model.safetensors), a Hugging Face folder
(safetensors and pytorch_model.bin), a fairseq .pt (zip and legacy pickle formats), bare state dicts
(.pt, legacy .bin, .safetensors). Examples are bounded and derandomized (seeded) so the file runs in
well under a minute on an idle machine; a SIGALRM guard turns a hang into a failure.
"""

from __future__ import annotations

import argparse
import os
import pickle
import posix
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from residual_probe.checkpoints import CheckpointError, load_any, save_model
from residual_probe.checkpoints.fairseq import fairseq_state
from residual_probe.checkpoints.native import unique_state
from residual_probe.checkpoints.safetensors_io import save_file

# FUZZ_EXAMPLES=2000 runs a deeper, randomized pass (not part of the suite's time budget).
DEEP = int(os.environ.get("FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=DEEP or 30,
    deadline=None,
    derandomize=not DEEP,
    database=None,
    suppress_health_check=list(HealthCheck),
)
FEW = settings(
    FUZZ, max_examples=DEEP or 12
)  # formats whose valid variants take transformers' full load
HANG_SECONDS = 30


class Hang(BaseException):  # not an Exception: no loader's `except Exception` may swallow it
    pass


@contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    def on_alarm(signum, frame):
        raise Hang(f"loading took over {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def canary(monkeypatch):
    """Anything that would run a shell command records it instead (checked after every load)."""
    ran: list = []
    for mod in (os, posix):
        monkeypatch.setattr(mod, "system", lambda *a, **k: ran.append(a) or 0)
    monkeypatch.setattr(subprocess.Popen, "__init__", lambda self, *a, **k: ran.append(a))
    return ran


def flip(data: bytes, flips) -> bytes:
    out = bytearray(data)
    for pos, bit in flips:
        out[pos % len(out)] ^= 1 << bit
    return bytes(out)


def mutations(data: bytes):
    """Truncations, bit flips (biased to the first and last 600 bytes, where headers and zip
    directories live), spliced random bytes, and random files with the real file's first bytes."""
    n = len(data)
    pos = st.one_of(
        st.integers(0, min(n - 1, 600)), st.integers(max(0, n - 600), n - 1), st.integers(0, n - 1)
    )
    return st.one_of(
        st.integers(0, n - 1).map(lambda k: data[:k]),
        st.lists(st.tuples(pos, st.integers(0, 7)), min_size=1, max_size=6).map(
            lambda f: flip(data, f)
        ),
        st.tuples(pos, st.binary(min_size=1, max_size=64)).map(
            lambda t: data[: t[0]] + t[1] + data[t[0] + len(t[1]) :]
        ),
        st.tuples(st.integers(0, 16), st.binary(max_size=600)).map(lambda t: data[: t[0]] + t[1]),
    )


def attempt(load, path, ran) -> str:
    """'loaded' or 'error' (a one-line CheckpointError); anything else fails the test."""
    try:
        with no_hang():
            load(path)
        result = "loaded"
    except CheckpointError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        result = "error"
    assert not ran, f"code ran while loading: {ran}"
    return result


def fuzz_model(placement="pre-ln", arch="decoder", **kw):
    return tiny_model(placement, arch, **{"d_model": 8, "ffn": 16, "vocab_size": 40, **kw})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    model = fuzz_model()
    save_model(model, root / "native")
    state = unique_state(model)
    torch.save(state, root / "bare.pt")
    torch.save(state, root / "bare.bin", _use_new_zipfile_serialization=False)
    save_file(state, root / "bare.safetensors")
    s2s = fuzz_model(
        "post-ln", "seq2seq", position_offset=2
    )  # fairseq's positions start at padding_idx + 1
    c = s2s.cfg
    args = argparse.Namespace(
        arch="transformer",
        activation_fn="relu",
        max_source_positions=c.max_len,
        max_target_positions=c.max_len,
        **{
            f"{s}_{k}": v
            for s in ("encoder", "decoder")
            for k, v in (
                ("embed_dim", c.d_model),
                ("ffn_embed_dim", c.ffn),
                ("layers", c.depth),
                ("attention_heads", c.heads),
                ("normalize_before", False),
            )
        },
    )
    ckpt = {"model": fairseq_state(s2s), "args": args, "extra_state": {"epoch": 3}}
    torch.save(ckpt, root / "fairseq.pt")
    torch.save(ckpt, root / "fairseq_legacy.pt", _use_new_zipfile_serialization=False)
    for p in (
        "native",
        "bare.pt",
        "bare.bin",
        "bare.safetensors",
        "fairseq.pt",
        "fairseq_legacy.pt",
    ):
        assert attempt(loader(p), root / p, []) == "loaded", p  # every seed file is valid
    return root


BARE = dict(placement="pre-ln", heads=2)


def loader(name: str):
    return (lambda p: load_any(p, **BARE)) if name.startswith("bare") else load_any


def write_mutant(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "name", ["bare.pt", "bare.bin", "bare.safetensors", "fairseq.pt", "fairseq_legacy.pt"]
)
def test_single_file_formats(files, tmp_path_factory, name, canary):
    data = (files / name).read_bytes()
    scratch = tmp_path_factory.mktemp("mutants")
    outcomes = []

    @FUZZ
    @given(mutations(data))
    def check(mutant):
        outcomes.append(attempt(loader(name), write_mutant(scratch, name, mutant), canary))

    check()
    assert "error" in outcomes  # the mutations did reach the loader's checks
    print(name, {k: outcomes.count(k) for k in set(outcomes)})


def mutated_folder(source: Path, part: str, budget, tmp_path_factory, canary) -> list[str]:
    """Each outcome of loading a copy of the folder `source` whose file `part` is replaced by a
    mutation of itself (`budget`: the hypothesis settings)."""
    import shutil

    folder = tmp_path_factory.mktemp("mutant") / "model"
    shutil.copytree(source, folder)
    outcomes = []

    @budget
    @given(mutations((source / part).read_bytes()))
    def check(mutant):
        (folder / part).write_bytes(mutant)
        outcomes.append(attempt(load_any, folder, canary))

    check()
    return outcomes


@pytest.mark.parametrize("part", ["model.safetensors", "config.json"])
def test_native_folder(files, tmp_path_factory, part, canary):
    assert "error" in mutated_folder(files / "native", part, FUZZ, tmp_path_factory, canary)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=40, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(root / "st")
    model.save_pretrained(
        root / "bin"
    )  # then the weights as a torch pickle, as older transformers saved them
    (root / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    for sub in ("st", "bin"):
        assert attempt(load_any, root / sub, []) == "loaded"
    return root


@pytest.mark.parametrize(
    "sub, part", [("st", "model.safetensors"), ("bin", "pytorch_model.bin"), ("st", "config.json")]
)
def test_hugging_face_folder(hf_folders, tmp_path_factory, sub, part, canary):
    assert "error" in mutated_folder(hf_folders / sub, part, FEW, tmp_path_factory, canary)


class Shell:
    def __reduce__(self):
        return (posix.system, ("echo pwned",))


# pickled here, at import, before the canary replaces posix.system
EVIL = {
    proto: pickle.dumps({"w": [1.0, 2.0], "evil": Shell()}, protocol=proto)
    for proto in range(pickle.HIGHEST_PROTOCOL + 1)
}
EVIL_BARE = pickle.dumps(Shell(), protocol=2)


@given(
    junk=st.binary(max_size=64),
    protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
    cut=st.integers(0, 40),
)
@settings(FUZZ, max_examples=40)
def test_a_pickle_calling_system_is_refused_as_unsafe_even_when_damaged(
    tmp_path_factory, canary, junk, protocol, cut
):
    """Plain pickles (one record, not torch's legacy four), with trailing junk or cut short after the
    payload's global: refused as unsafe and named so, never reported as merely corrupt, never run."""
    raw = EVIL[protocol]
    at = raw.find(b"system") + len(b"system")
    mutant = raw + junk if cut == 0 else raw[: at + cut]
    path = write_mutant(tmp_path_factory.mktemp("evil"), "evil.pt", mutant)
    with pytest.raises(
        CheckpointError, match=r"refusing to load: the pickle calls posix\.system.*unsafe pickle"
    ):
        with no_hang():
            load_any(path)
    assert not canary


def test_a_text_file_named_safetensors_is_not_a_safetensors_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_text("these are not the weights you are looking for\n" * 3)
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: not a safetensors file"):
        load_any(path, **BARE)


def test_the_cli_answers_corrupt_files_with_one_line_and_exit_2(files, tmp_path):
    from typer.testing import CliRunner

    from residual_probe.cli import app

    cases = {
        "bare.safetensors": (files / "bare.safetensors").read_bytes()[:100],
        "fairseq.pt": flip((files / "fairseq.pt").read_bytes(), [(40, 3), (41, 5)]),
        "text.safetensors": b"hello\n" * 10,
        "evil.pt": EVIL_BARE,
        "random.bin": bytes(range(256)) * 3,
    }
    for name, data in cases.items():
        path = write_mutant(tmp_path, name, data)
        result = CliRunner().invoke(
            app,
            [
                "collapse",
                "--ckpt",
                str(path),
                "--placement",
                "pre-ln",
                "--heads",
                "2",
                "--out",
                str(tmp_path / "out"),
            ],
        )
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
            name,
            result.output,
        )
        assert "Traceback" not in result.output
