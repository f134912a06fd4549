"""Safe loading: native round trip, safetensors interop, bad files, and a planted pickle payload."""

from __future__ import annotations

import argparse
import os
import struct

import pytest
import torch
from conftest import tiny_model

from residual_probe.checkpoints import CheckpointError, load_model, save_model
from residual_probe.checkpoints.safe_pickle import Inert, load_pickle, mapping
from residual_probe.checkpoints.safetensors_io import load_file, save_file


class Payload:
    """Unpickling this object would create `target` (via eval) if pickled code ran."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (eval, (f"open({self.target!r}, 'w').write('pwned')",))


class ShellPayload(Payload):
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class Meter:  # stands in for fairseq's meters: a plain class, not a tensor
    def __init__(self):
        self.avg, self.count = 2.5, 7


def tiny(placement="pre-ln", arch="decoder", **kw):
    return tiny_model(placement, arch, **kw).eval()


@pytest.mark.parametrize(
    "placement,arch", [("pre-ln", "decoder"), ("residual", "seq2seq"), ("rezero", "encoder")]
)
def test_native_round_trip_gives_identical_outputs(tmp_path, placement, arch):
    model = tiny(placement, arch)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg == model.cfg
    tokens = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    args = (tokens, tokens.flip(1)) if arch == "seq2seq" else (tokens,)
    with torch.no_grad():
        assert torch.equal(model(*args), loaded(*args))
    # Tied output projection is stored once and re-tied on load.
    assert loaded.output_projection.weight is loaded.stacks()[-1][1].embed_tokens.weight


def test_own_safetensors_matches_the_reference_package(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.randn(2, 2).bfloat16(),
        "d": torch.tensor([True, False, True]),
        "e": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "ours.safetensors", {"k": "v"})
    theirs = safetensors.load_file(str(tmp_path / "ours.safetensors"))
    safetensors.save_file(tensors, str(tmp_path / "ref.safetensors"))
    ours, meta = load_file(tmp_path / "ref.safetensors")
    assert meta == {}
    for name, t in tensors.items():
        assert (
            torch.equal(theirs[name], t)
            and torch.equal(ours[name], t)
            and ours[name].dtype == t.dtype
        )


def test_bad_safetensors_files_raise_one_clear_error(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "good.safetensors")
    raw = (tmp_path / "good.safetensors").read_bytes()
    cases = {
        "empty": b"",
        "short": raw[:5],
        "truncated": raw[: len(raw) // 2],
        "text": b"hello world, not weights at all",
        "badjson": struct.pack("<Q", 4) + b"{x}!",
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_file(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(info.value)


def test_native_folder_errors(tmp_path):
    model = tiny()
    save_model(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(tmp_path / "m")
    save_model(model, tmp_path / "n")
    cfg = (tmp_path / "n" / "config.json").read_text().replace('"depth": 2', '"depth": 3')
    (tmp_path / "n" / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="missing .* weights"):
        load_model(tmp_path / "n")
    (tmp_path / "n" / "config.json").write_text(cfg.replace('"depth": 3', '"depht": 3'))
    with pytest.raises(CheckpointError, match="depht"):
        load_model(tmp_path / "n")


def test_pickle_payload_never_runs(tmp_path):
    target = tmp_path / "pwned"
    ckpt = {
        "model": {"w": torch.ones(2)},
        "args": argparse.Namespace(arch="transformer", encoder_layers=3),
        "extra_state": {"meter": Meter(), "evil": Payload(target)},
    }
    for legacy in (False, True):
        path = tmp_path / f"ckpt{int(legacy)}.pt"
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
        loaded = load_pickle(path)
        assert not target.exists()
        assert torch.equal(loaded["model"]["w"], torch.ones(2))
        assert mapping(loaded["args"]) == {"arch": "transformer", "encoder_layers": 3}
        assert isinstance(loaded["extra_state"]["evil"], Inert)
        assert loaded["extra_state"]["evil"].qualified == "builtins.eval"
        assert mapping(loaded["extra_state"]["meter"]) == {"avg": 2.5, "count": 7}
    torch.save({"model": {}, "evil": ShellPayload(target)}, tmp_path / "shell.pt")
    with pytest.raises(CheckpointError, match="refusing to load: the pickle calls posix.system"):
        load_pickle(tmp_path / "shell.pt")
    assert not target.exists()
    # The explicit opt-in really is plain pickle: it runs the payload (and warns).
    load_pickle(tmp_path / "ckpt0.pt", trust=True)
    assert target.exists()


def test_bad_pickle_files_raise_one_clear_error(tmp_path):
    torch.save({"w": torch.randn(100, 100)}, tmp_path / "good.pt")
    raw = (tmp_path / "good.pt").read_bytes()
    cases = {
        "empty": b"",
        "truncated": raw[: len(raw) // 3],
        "text": b"just some text\n",
        "zeros": b"\0" * 64,
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_pickle(tmp_path / f"{name}.pt")
        assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_pickle(tmp_path / "absent.pt")
