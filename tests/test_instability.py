"""Instability events on runs where the answer is known: one block's learning rate multiplied at
a chosen step must be named with that step; a quiet run has no event; Post-LN without warm-up
on text, which fails, shows events from block 0 while Pre-LN in the same setting has none."""

import math

import pytest
import torch
import torch.nn.functional as F

from residual_probe.analysis.instability import Event, Monitor, find_events
from residual_probe.data import BatchSource, builtin_corpus, split_tokens
from residual_probe.models import ModelConfig, Transformer
from residual_probe.probe import Probe
from residual_probe.probe.scalars import InstabilityLog, SummaryWindow


def train(
    placement,
    steps,
    lr=1e-3,
    depth=6,
    d=32,
    block=None,
    at=None,
    mult=1.0,
    text=False,
    spikes=None,
):
    """A decoder trained with the probe; block `block`'s learning rate is multiplied by `mult` at step
    `at`; `spikes` {(step, block): factor} multiplies that block's gradient at that step (before the
    probe reads it)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="decoder",
        placement=placement,
        depth=depth,
        d_model=d,
        heads=2,
        ffn=2 * d,
        max_len=64,
        dropout=0.0,
    )
    model = Transformer(cfg)
    tokens = split_tokens(builtin_corpus())[0] if text else None
    src = BatchSource("decoder", 8, 32, cfg.vocab_size, 0, tokens)
    chosen = (
        {id(p) for p in model.decoder.layers[block].parameters()} if block is not None else set()
    )
    groups = [{"params": [p for p in model.parameters() if id(p) not in chosen]}]
    if chosen:
        groups.append({"params": list(model.decoder.layers[block].parameters())})
    opt = torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.98))
    probe = Probe(model, quantities=("param_grad_norm", "update_ratio"), optimizer=opt)
    log, losses = InstabilityLog(), []
    with probe:
        for step in range(steps):
            opt.param_groups[-1]["lr"] = lr * (mult if step == at else 1.0)
            b = src.next()
            opt.zero_grad()
            loss = F.cross_entropy(model(*b.inputs).flatten(0, 1), b.targets.flatten())
            loss.backward()
            for (s, k), factor in (spikes or {}).items():
                if s == step:
                    for p in model.decoder.layers[k].parameters():
                        p.grad.mul_(factor)
            log.update(probe.step())
            opt.step()
            losses.append(float(loss.detach()))
    log.update(probe.step())  # the last update's ratios
    return probe.rows(), log, losses


@pytest.mark.parametrize("placement", ["pre-ln", "post-ln"])
def test_a_block_whose_learning_rate_blew_up_is_named_with_its_step(placement):
    rows, log, _ = train(placement, 40, block=2, at=30, mult=300.0)
    events = find_events(rows)
    assert len(events) == 1
    e = events[0]
    assert (e.step, e.stack, e.layer, e.metric) == (
        30,
        "decoder",
        2,
        "update_ratio",
    ) and e.ratio > 50
    assert "step 30: decoder block 2" in e.describe()
    # the online monitor (the callbacks' and train's) finds the same event
    assert [(x.step, x.layer) for x in log.monitor.events] == [(30, 2)]
    assert log.values() == {
        "probe/instability_events": 1.0,
        "probe/instability_last_block": 2.0,
        "probe/precursors": 0.0,  # gradient rows only: no precursor series
    }


def test_a_quiet_run_has_no_event():
    rows, log, _ = train("pre-ln", 40)
    assert find_events(rows) == [] and log.values()["probe/instability_events"] == 0.0


@pytest.fixture
def flush_denormals():
    """Post-LN's vanishing gradients reach float32 denormals, which the CPU computes ~30x slower."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def test_post_ln_without_warmup_on_text_shows_events_that_pre_ln_does_not(flush_denormals):
    post_rows, _, post_loss = train("post-ln", 50, depth=12, d=64, text=True)
    pre_rows, _, pre_loss = train("pre-ln", 50, depth=12, d=64, text=True)
    post, pre = find_events(post_rows), find_events(pre_rows)
    assert pre == [] and min(pre_loss) < min(post_loss)  # Pre-LN trains and is quiet
    # Post-LN: block 0's gradient spikes first (step 22) and settles; each later spike (step 32,
    # 49) starts at block 0 again, and the blocks above follow on the same step
    assert post and (post[0].step, post[0].layer, post[0].metric) == (22, 0, "param_grad_norm")
    assert len(post) >= 2 and all(e.layer == 0 for e in post)
    assert all(f["step"] == e.step for e in post[1:] for f in e.followers) and post[1].followers


def grad_row(step: int, layer: int, value: float) -> dict:
    """A probe row of a decoder block's whole-block gradient norm."""
    return dict(
        step=step,
        stack="decoder",
        layer=layer,
        sublayer="block",
        stream="x",
        metric="param_grad_norm",
        value=value,
    )


def test_rule_on_hand_made_rows():
    """Block 3 jumps 10x at step 12, block 4 follows at 13; a slow drift is not an event; NaN is."""
    rows = []
    for step in range(50):
        for k in range(6):
            v = 1.0 * 0.97**step  # drifting down 3 % a step
            if k == 3 and step == 12:
                v *= 10
            if k == 4 and step == 13:
                v *= 8
            rows.append(grad_row(step, k, v))
    (e,) = find_events(rows)  # the slow drift (3 % a step) is not an event
    assert (e.step, e.layer, round(e.ratio, 1)) == (
        12,
        3,
        8.2,
    )  # 10 x 0.97^12 over the median of steps 0-11
    assert [(f["layer"], f["step"]) for f in e.followers] == [(4, 13)]
    rows.append(grad_row(40, 0, math.nan))
    assert find_events(rows)[-1].step == 40 and "nan" in find_events(rows)[-1].describe()
    assert find_events(rows, k=20.0)[0].step == 40  # a larger k: the 10x jump is not an event
    with pytest.raises(ValueError):
        Monitor(k=1.0)
    row = e.to_row()
    assert Event(**row) == e and row["followers"] == [dict(e.followers[0])]  # the row round-trips


def test_summary_window_keeps_the_max_between_logs():
    w = SummaryWindow()
    for v in (1.0, 9.0, math.nan, 2.0):
        w.add({"probe/grad_norm/decoder/00": v})
    out = w.take()
    assert out == {"probe/grad_norm/decoder/00": 2.0, "probe_max/grad_norm/decoder/00": 9.0}
    assert not w and w.take() == {}


def spiked_rows(spikes, steps=60, depth=6):
    """Hand-made whole-block gradient norms (1.0, +-10 % seeded noise) with `spikes`
    {(step, block): factor}."""
    import random

    rng = random.Random(0)
    return [
        grad_row(step, k, (1.0 + 0.1 * rng.uniform(-1, 1)) * spikes.get((step, k), 1.0))
        for step in range(steps)
        for k in range(depth)
    ]


def test_a_second_spike_after_the_first_settled_is_its_own_event():
    """Spikes at step 23 (block 0, 20x) and step 40 (block 2, 50x): block 0 is back at step 24, so
    the second spike is a second event with its own origin, step and size, and the loggers' count
    (InstabilityLog, what the callbacks and TensorBoard show) is 2; a spike that carries over to
    the next step's gradient of another block stays one event."""
    rows = spiked_rows({(23, 0): 20.0, (40, 2): 50.0})
    events = find_events(rows)
    assert [(e.step, e.layer, e.followers) for e in events] == [(23, 0, []), (40, 2, [])]
    assert events[1].ratio == pytest.approx(50.0, rel=0.25) and events[1].value > 40
    log = InstabilityLog()
    for step in range(60):  # online, one recorded step at a time, as the callbacks feed it
        log.update([r for r in rows if r["step"] == step])
    assert log.values() == {
        "probe/instability_events": 2.0,
        "probe/instability_last_block": 2.0,
        "probe/precursors": 0.0,  # gradient rows only: no precursor series
    }
    # block 0 out at 23, block 3 at 24 while block 0 is back: block 3 follows (0 was out at 23)
    (e,) = find_events(spiked_rows({(23, 0): 20.0, (24, 3): 30.0}))
    assert (e.step, e.layer) == (23, 0) and [(f["layer"], f["step"]) for f in e.followers] == [
        (3, 24)
    ]
    assert "block 3 at step 24 (" in e.describe()
    # the same on a real run: the gradients of block 0 at step 23 and block 2 at step 40 multiplied
    rows, log, _ = train("pre-ln", 50, spikes={(23, 0): 20.0, (40, 2): 50.0})
    events = find_events(rows)
    assert [(e.step, e.layer) for e in events] == [(23, 0), (40, 2)] and events[1].ratio > 25
    assert log.values() == {
        "probe/instability_events": 2.0,
        "probe/instability_last_block": 2.0,
        "probe/precursors": 0.0,  # gradient rows only: no precursor series
    }


def test_grad_steps_draws_every_event_origin_block(tmp_path, monkeypatch):
    """`plot` of a sink with spikes at block 0 (step 23) and block 2 (step 40) of 8: grad_steps.png
    draws block 2 too (not only the first, median and last blocks), its spike at step 40."""
    import csv

    from residual_probe.jobs.plot import run_plot
    from residual_probe.plots import run as plots

    rows = spiked_rows({(23, 0): 20.0, (40, 2): 50.0}, depth=8)
    with open(tmp_path / "probe.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    drawn, save = {}, plots.save

    def keep(fig, stem, formats):  # the top panel's lines, then the file as usual
        if stem.name == "grad_steps":
            drawn.update({ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines()})
        return save(fig, stem, formats)

    monkeypatch.setattr(plots, "save", keep)
    meta = run_plot(tmp_path / "probe.csv", tmp_path / "plots")
    assert [(e["step"], e["layer"]) for e in meta["instability_events"]] == [(23, 0), (40, 2)]
    blocks = sorted(label for label in drawn if label.startswith("block"))
    assert blocks == [
        "block 0 (first, event origin)",
        "block 2 (event origin)",
        "block 4 (median)",
        "block 7 (last)",
    ]
    y = drawn["block 2 (event origin)"]
    assert int(y.argmax()) == 40 and y.max() > 40
    assert (tmp_path / "plots" / "grad_steps.png").stat().st_size > 5000
