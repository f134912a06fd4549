"""TensorBoard and W&B writers, read back with each tool's own files; probe.summary; missing extras.

A real probe run on a small reference model gives the rows; the TensorBoard event file is read
with tensorboard's EventAccumulator, the W&B offline run file (LevelDB-style log of protobuf
records) with wandb's own protobuf classes. No network.
"""

import glob
import json
import math
import struct
import sys

import numpy as np
import pytest
import torch

from residual_probe.data import BatchSource
from residual_probe.models import ModelConfig, Transformer
from residual_probe.probe import Probe
from residual_probe.probe.scalars import summary


def probe_steps(steps=3, arch="decoder", placement="pre-ln", depth=3, nan_at=None):
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch=arch, placement=placement, depth=depth, d_model=16, heads=2, ffn=32, max_len=64
    )
    model = Transformer(cfg)
    src = BatchSource(arch, 2, 6, cfg.vocab_size, 0)
    probe = Probe(
        model, quantities=("param_grad_norm", "act_grad_norm", "w2_grad_norm", "forward_stats")
    )
    out = []
    with probe:
        for s in range(steps):
            b = src.next()
            model.zero_grad()
            torch.nn.functional.cross_entropy(
                model(*b.inputs).flatten(0, 1), b.targets.flatten()
            ).backward()
            if s == nan_at:
                next(probe.blocks[1].module.parameters()).grad.fill_(math.nan)
            out.append(probe.step())
    return out


def test_summary_keys_values_and_nan():
    steps = probe_steps(steps=2, arch="seq2seq", placement="residual", nan_at=1)
    s0 = summary(steps[0])
    rows = steps[0]
    g = {
        (r["stack"], r["layer"]): r["value"]
        for r in rows
        if r["metric"] == "param_grad_norm" and r["sublayer"] == "block"
    }
    assert s0["probe/grad_norm/decoder/02"] == g[("decoder", 2)]
    assert s0["probe/first_over_last/encoder"] == pytest.approx(
        g[("encoder", 0)] / g[("encoder", 2)]
    )
    infl = {
        (r["stack"], r["stream"], r["layer"]): r["value"]
        for r in rows
        if r["metric"] == "block_influence"
    }
    assert s0["probe/block_influence/decoder:d/01"] == infl[("decoder", "d", 1)]
    assert s0["probe/block_influence/encoder/00"] == infl[("encoder", "x", 0)]
    assert s0["probe/nonfinite_count"] == 0
    # per-block keys for two quantities, a handful of numbers per stack
    # 2 stacks x 3 blocks of grad_norm; first/last, rate, w2 per stack; 4 (stack, stream) of block influence
    # x 3 blocks, act-grad ratio, late cos; the non-finite count; the whole model: embedding (shared by
    # both stacks), the two stacks' final norms and the total (the head is tied)
    assert len(s0) == 2 * 3 + 2 * 3 + 4 * 3 + 4 + 4 + 1 + 3
    whole = {r["sublayer"]: r["value"] for r in rows if r["stack"] == "model"}
    assert s0["probe/grad_norm_model/total"] == whole["total"] and set(whole) == {
        "embedding",
        "final_norm",
        "total",
    }
    # the last step of a list of steps; NaN gradients give NaN summaries, not an exception
    s1 = summary(steps[0] + steps[1])
    assert math.isnan(s1["probe/grad_norm/encoder/01"]) and math.isnan(
        s1["probe/first_over_last/encoder"]
    )
    assert s1["probe/nonfinite_count"] > 0
    assert summary([]) == {}


def test_probe_summary_method():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            arch="decoder", placement="pre-ln", depth=3, d_model=16, heads=2, ffn=32, max_len=64
        )
    )
    src = BatchSource("decoder", 2, 6, 256, 0)
    with Probe(model, quantities=("param_grad_norm", "forward_stats")) as probe:
        assert probe.summary() == {}
        for _ in range(2):
            b = src.next()
            model.zero_grad()
            torch.nn.functional.cross_entropy(
                model(*b.inputs).flatten(0, 1), b.targets.flatten()
            ).backward()
            last = probe.step()
    assert probe.summary() == summary(last) and "probe/grad_norm/decoder/02" in probe.summary()


def test_tensorboard_event_file_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from residual_probe.integrations.tensorboard import ProbeWriter

    steps = probe_steps(steps=3, nan_at=2)
    tb = ProbeWriter(str(tmp_path), image_every=2)
    written = [tb.write(rows) for rows in steps]
    tb.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = acc.Tags()["scalars"]
    assert set(scalars) == set(written[0])
    # the writer runs the instability and precursor monitors: their counts so far, every step
    assert (
        [w["probe/precursors"] for w in written]
        == [0.0] * 3
        == [w["probe/instability_events"] for w in written]
    )
    for key in (
        "probe/grad_norm/decoder/01",
        "probe/first_over_last/decoder",
        "probe/block_influence/decoder/02",
    ):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [0, 1, 2]
        for e, w in zip(events, written):
            assert (math.isnan(e.value) and math.isnan(w[key])) or e.value == pytest.approx(
                w[key], rel=1e-6
            )
    images = acc.Images("probe/grad_norm_heatmap/decoder")
    assert [e.step for e in images] == [0, 2]  # written steps 1 and 3 (image_every=2)
    last = images[-1]
    assert (last.height, last.width) == (3, 3)  # 3 blocks x 3 steps so far
    import io

    from PIL import Image

    px = np.asarray(Image.open(io.BytesIO(last.encoded_image_string)).convert("RGB"))
    assert tuple(px[-2, 2]) == (214, 39, 40)  # block 1 (rows bottom-up), step 2: the NaN, in red
    assert tuple(px[-1, 0]) != (214, 39, 40)


def wandb_history(folder):
    """History records of an offline W&B run, read from its .wandb file with wandb's protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(str(folder / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(files) == 1, files
    data = open(files[0], "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(
        data
    ):  # LevelDB log format: 32 KiB blocks of (crc, length, type, data) records
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                out.append(
                    {
                        (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                        for i in rec.history.item
                    }
                )
    return out


def test_wandb_offline_run_files(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from residual_probe.integrations.wandb import ProbeWandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    steps = probe_steps(steps=3)
    run = wandb.init(project="residual-probe-test", dir=str(tmp_path))
    try:
        wb = ProbeWandb(run, image_every=3)
        written = [wb.write(rows) for rows in steps]
    finally:
        run.finish()
        wandb.teardown()  # the service writes the run file; it is complete once the service stops
    history = wandb_history(tmp_path)
    assert [h["_step"] for h in history] == [0, 1, 2]
    for h, w in zip(history, written):
        for key in (
            "probe/grad_norm/decoder/00",
            "probe/first_over_last/decoder",
            "probe/late_cos_adjacent/decoder",
        ):
            assert h[key] == pytest.approx(w[key], rel=1e-9)
    image = "probe/grad_norm_heatmap/decoder"
    assert history[0][f"{image}/_type"] == "image-file" and f"{image}/_type" not in history[1]
    assert (history[0][f"{image}/height"], history[0][f"{image}/width"]) == (
        3,
        1,
    )  # 3 blocks x 1 step
    png = list(tmp_path.glob(f"wandb/offline-run-*/files/{history[0][f'{image}/path']}"))
    assert len(png) == 1 and png[0].read_bytes()[:4] == b"\x89PNG"


def test_missing_extra_names_it(monkeypatch):
    from residual_probe.integrations import MissingExtraError

    for module, extra in (
        ("residual_probe.integrations.lightning", "lightning"),
        ("residual_probe.integrations.hf", "hf"),
    ):
        monkeypatch.setitem(sys.modules, extra if extra != "hf" else "transformers", None)
        monkeypatch.delitem(sys.modules, module, raising=False)
        with pytest.raises(MissingExtraError, match=rf"pip install 'residual-probe\[{extra}\]'"):
            __import__(module)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    from residual_probe.integrations.tensorboard import ProbeWriter

    with pytest.raises(MissingExtraError, match=r"residual-probe\[tensorboard\]"):
        ProbeWriter("/nonexistent")


BLOCK_EXTRAS = """
import sys
from residual_probe.integrations import EXTRA_OF

class NoExtras:  # an interpreter where no optional package is installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRA_OF:
            raise ImportError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoExtras())
import residual_probe.checkpoints, residual_probe.cli.app, residual_probe.probe
print(sorted(m for m in sys.modules if m.split(".")[0] in EXTRA_OF))
"""


def test_the_core_imports_without_any_extra():
    """In a fresh interpreter that cannot import any optional package: the probe, the loaders and
    the command line import, and none of the extras was loaded."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_EXTRAS], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
