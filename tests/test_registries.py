"""One list per registry: a placement or a quantity registered at run time reaches every
consumer (config, budget, plot, style; schedule and Probe) without another list to edit."""

import torch
from conftest import tiny_model

from residual_probe.models import PLACEMENTS
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

    assert isinstance(tiny_model("my-ln").decoder.placement, MyLN)
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
    """A quantity registered from outside gets the blocks' forward hook on its scheduled steps and
    its rows reach `probe.step()`, beside the built-in ones."""
    from residual_probe.probe import Probe
    from residual_probe.probe.quantities import REGISTRY, Quantity
    from residual_probe.probe.records import row

    class Calls(Quantity):
        name = "forward_calls"  # forwards of each block this step
        uses_forward = True
        default = False

        def begin(self, step):
            super().begin(step)
            self.calls = torch.zeros(len(self.setup.blocks))

        def forward(self, pos, block, ins, outs):
            self.calls[pos] += 1

        def values(self, ctx, pooled):  # the two-argument form of a quantity without maxima
            return self.calls if self.is_active else None

        def rows(self, step, host):
            blocks = self.setup.blocks
            return [
                row(step, b.stack, b.index, "block", "-", self.name, v)
                for b, v in zip(blocks, host)
            ]

    monkeypatch.setitem(REGISTRY, "forward_calls", Calls)
    model = tiny_model()
    probe = Probe(model, quantities=("param_grad_norm", "forward_calls"))
    x = torch.randint(0, 100, (2, 8))
    with probe:
        model(x)
        model(x).sum().backward()  # two forwards in one step
        rows = probe.step()
    calls = {r["layer"]: r["value"] for r in rows if r["metric"] == "forward_calls"}
    assert calls == {0: 2.0, 1: 2.0}
    grads = {r["layer"] for r in rows if r["metric"] == "param_grad_norm"}
    assert grads == {-1, 0, 1}  # -1: the embedding
