"""One list per registry: a placement or a quantity registered at run time reaches every
consumer (config, budget, plot, style; schedule and Probe) without another list to edit."""

import torch

from residual_probe.models import PLACEMENTS, ModelConfig, Transformer
from residual_probe.models.placements import register


def test_a_new_placement_reaches_config_budget_plot_and_style(tmp_path, monkeypatch):
    from residual_probe.budget import train_estimate
    from residual_probe.jobs.plot import run_plot
    from residual_probe.jobs.train import TrainSpec
    from residual_probe.plots.style import PLACEMENT_COLORS, color

    monkeypatch.setitem(PLACEMENTS, "my-ln", None)

    @register
    class MyLN(PLACEMENTS["post-ln"]):  # Post-LN's formula under a new name
        name = "my-ln"

    cfg = ModelConfig(
        arch="decoder", placement="my-ln", depth=2, d_model=16, heads=2, ffn=32, max_len=32
    )
    assert isinstance(Transformer(cfg).decoder.placement, MyLN)
    assert (
        train_estimate(
            TrainSpec(
                placement="my-ln", depth=2, d_model=16, heads=2, ffn=32, batch=2, seq_len=8, steps=1
            )
        ).peak_bytes
        > 0
    )
    new = color("my-ln")
    assert new not in PLACEMENT_COLORS.values() and new != color("not-a-placement")
    sink = tmp_path / "probe.jsonl"
    sink.write_text(
        "".join(
            f'{{"step": 0, "stack": "decoder", "layer": {k}, "sublayer": "block", "stream": "x", '
            f'"metric": "param_grad_norm", "value": {1.0 + k}}}\n'
            for k in range(3)
        )
    )
    summary = run_plot(sink, tmp_path / "out", placement="my-ln")  # plot --placement accepts it
    assert summary["placement"] == "my-ln"


def test_a_new_quantity_reaches_the_probe(monkeypatch):
    from residual_probe.probe import Probe
    from residual_probe.probe.quantities import DEFAULT_QUANTITIES, REGISTRY, Quantity

    class Zero(Quantity):
        name = "zero"  # the base class's life cycle: records nothing
        default = False

    monkeypatch.setitem(REGISTRY, "zero", Zero)
    model = Transformer(
        ModelConfig(
            arch="decoder", placement="pre-ln", depth=2, d_model=16, heads=2, ffn=32, max_len=32
        )
    )
    probe = Probe(model, quantities=("param_grad_norm", "zero"))
    assert "zero" in probe.schedule.rules and "update_ratio" not in DEFAULT_QUANTITIES
    x = torch.randint(0, 100, (2, 8))
    with probe:
        model(x).sum().backward()
        probe.step()
