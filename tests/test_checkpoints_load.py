"""load_any: dispatch by content, bare state dicts with user flags, and placement detection on our models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from residual_probe.checkpoints import CheckpointError, load_any, save_model
from residual_probe.checkpoints.native import unique_state
from residual_probe.checkpoints.safetensors_io import save_file


def model_of(placement="pre-ln", arch="decoder", **kw):
    sizes = dict(depth=4, heads=4, ffn=24, max_len=64, mix_ratio=0.5)
    return tiny_model(placement, arch, **{**sizes, **kw}).eval()


def body(loaded, ids):
    with torch.no_grad():
        return loaded.forward(ids)


def test_native_folder_through_load_any(tmp_path):
    model = model_of("residual", arch="seq2seq")
    save_model(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    ids = torch.randint(1, 256, (2, 12))
    assert loaded.family == "residual-probe" and loaded.declared_placement == "residual"
    with torch.no_grad():
        assert torch.equal(body(loaded, ids), model.decoder(ids, memory=model.encoder(ids)))
    with pytest.raises(CheckpointError, match="--depth only apply to bare state dicts"):
        load_any(tmp_path / "m", depth=4)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "wrapped"])
def test_bare_state_dict_with_flags(tmp_path, fmt):
    model = model_of("post-ln", tie_embeddings=False)
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(unique_state(model), path)
    else:
        torch.save(
            {"state_dict": model.state_dict(), "epoch": 3}
            if fmt == "wrapped"
            else model.state_dict(),
            path,
        )
    loaded = load_any(path, placement="post-ln", heads=4, depth=4)
    assert loaded.model.cfg.tie_embeddings is False and loaded.model.cfg.d_model == 16
    ids = torch.randint(1, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(body(loaded, ids), model.decoder(ids))
    with pytest.raises(CheckpointError, match="pass --placement"):
        load_any(path, heads=4)
    with pytest.raises(CheckpointError, match="--depth 6 but the weights have 4"):
        load_any(path, placement="post-ln", heads=4, depth=6)
    with pytest.raises(CheckpointError, match="heads"):
        load_any(path, placement="post-ln", heads=5)


def test_wrong_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_any(tmp_path / "nothing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_any(tmp_path / "empty.pt")
    torch.save({"lr": 0.1, "note": "hi"}, tmp_path / "notweights.pt")
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_any(tmp_path / "notweights.pt", placement="pre-ln", heads=2)
    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "mlp.pt")
    with pytest.raises(CheckpointError, match="no transformer layers"):
        load_any(tmp_path / "mlp.pt", placement="pre-ln", heads=2)
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        load_any(tmp_path / "folder")
