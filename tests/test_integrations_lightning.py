"""ProbeCallback in a real Lightning run: pre-clip accumulated norms, logged summaries, sink.

The pre-clip reference is read inside Lightning itself, in `configure_gradient_clipping`, right
before the module clips. Single process (a 2-process DDP run costs more than the suite allows).
"""

import csv
import json
import math
from importlib.util import find_spec

import pytest
import torch

from residual_probe.data import BatchSource
from residual_probe.models import ModelConfig, Transformer
from residual_probe.probe import find_blocks
from residual_probe.probe.records import read_sink

pytestmark = pytest.mark.skipif(find_spec("lightning") is None, reason="lightning is not installed")


@pytest.fixture(scope="module")
def L():
    """lightning, imported when a test here runs, not at collection (2 s in every xdist worker)."""
    import lightning

    return lightning


def callback(**kwargs):
    from residual_probe.integrations.lightning import ProbeCallback

    return ProbeCallback(**kwargs)


def lm(L):
    """A post-LN reference decoder as a LightningModule that records the pre-clip per-block norms."""

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = Transformer(
                ModelConfig(
                    arch="decoder",
                    placement="post-ln",
                    depth=3,
                    d_model=16,
                    heads=2,
                    ffn=32,
                    max_len=64,
                )
            )
            self.ref = {}

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x).flatten(0, 1), y.flatten())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            self.ref[self.global_step] = [
                math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in b.module.parameters()))
                for b in find_blocks(self.model)
            ]
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            self.clipped = math.sqrt(
                sum(float((p.grad.double() ** 2).sum()) for p in self.parameters())
            )

    return LM()


def loader(n):
    src = BatchSource("decoder", 2, 6, 256, 0)
    batches = [src.next() for _ in range(n)]
    data = [(b.inputs[0][i], b.targets[i]) for b in batches for i in range(2)]
    return torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)


def test_lightning_preclip_accumulated_norms_and_logs(tmp_path, L):
    module = lm(L)
    cb = callback(quantities=("param_grad_norm", "forward_stats"))
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(
        max_steps=3,
        accumulate_grad_batches=2,
        gradient_clip_val=1e-4,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[cb],
    )
    trainer.fit(module, loader(6))
    rows = cb.probe.rows()
    got = {}
    for r in rows:
        if r["metric"] == "param_grad_norm" and r["sublayer"] == "block":
            got.setdefault(r["step"], {})[r["layer"]] = r["value"]
    assert (
        sorted(got) == sorted(module.ref) == [0, 1, 2]
    )  # one step per optimizer step (2 micro-batches each)
    for s, ref in module.ref.items():
        assert [got[s][k] for k in sorted(got[s])] == pytest.approx(ref, rel=1e-5)
    assert (
        module.clipped == pytest.approx(1e-4, rel=1e-3) and min(module.ref[2]) > 100 * 1e-4
    )  # clipped hard
    # the sink, under the logger's folder
    sink = cb.sink_path
    assert sink.parent == tmp_path / "run" / "version_0" and sink.name == "probe.csv"
    assert len(read_sink(sink).rows) == len(rows)
    # summaries in the logger's metrics
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("probe/grad_norm/decoder/00")]
    assert len(logged) == 3
    assert float(logged[-1]["probe/grad_norm/decoder/02"]) == pytest.approx(got[2][2], rel=1e-6)
    assert float(logged[-1]["probe/first_over_last/decoder"]) == pytest.approx(
        got[2][0] / got[2][2], rel=1e-6
    )
    assert (
        "probe/block_influence/decoder/01" in logged[-1]
        and "probe/late_cos_adjacent/decoder" in logged[-1]
    )
    # the precursor monitor runs beside the instability monitor: its count in every log
    assert [float(r["probe/precursors"]) for r in logged] == [
        float(len(cb.instability.precursors.precursors))
    ] * 3
    # the logged step is the probe's step (Lightning writes a step's metrics under its global_step)
    assert [int(r["step"]) for r in logged] == [0, 1, 2]
    # the run's metadata beside the sink, as the Hugging Face callback writes it: plot knows the placement
    info = json.loads((sink.parent / "probe_run.json").read_text())
    assert info["placement"] == "post-ln" and info["placement_source"] == "the model's config"


def test_lightning_logs_the_max_since_the_previous_log(tmp_path, L):
    """log_every_n_steps=3: one log at step 2 with step 2's values and the max over steps 0-2."""
    module = lm(L)
    cb = callback(quantities=("param_grad_norm",))
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[cb],
    )
    trainer.fit(module, loader(3))
    per_step = {
        r["step"]: r["value"]
        for r in cb.probe.rows()
        if r["metric"] == "param_grad_norm" and r["layer"] == 0 and r["sublayer"] == "block"
    }
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as fh:
        logged = [r for r in csv.DictReader(fh) if r.get("probe/grad_norm/decoder/00")]
    assert [int(r["step"]) for r in logged] == [2]
    assert (
        max(per_step.values()) > per_step[2]
    )  # the max is not the last value: the window is what is tested
    assert float(logged[0]["probe/grad_norm/decoder/00"]) == pytest.approx(per_step[2], rel=1e-6)
    assert float(logged[0]["probe_max/grad_norm/decoder/00"]) == pytest.approx(
        max(per_step.values()), rel=1e-6
    )
