"""`residual-probe train`: a few steps of a tiny model write files that reload to the same model."""

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from residual_probe.checkpoints import load_model
from residual_probe.cli import app
from residual_probe.data import BatchSource
from residual_probe.jobs.train import TrainSpec, run_train
from residual_probe.probe.records import read_sink
from residual_probe.training import lr_schedule

TINY = dict(
    depth=3, d_model=16, heads=2, ffn=32, batch=4, seq_len=16, steps=6, probe_every=2, eval_every=3
)


def test_a_run_for_a_study_draws_nothing_and_says_so(tmp_path):
    meta = run_train(TrainSpec(placement="pre-ln", **TINY), tmp_path, draw=False)
    assert not list(tmp_path.glob("*.png")) and meta["probe_figures"].startswith("not drawn")
    files = json.loads((tmp_path / "train.json").read_text())["files"]
    assert files == [str(tmp_path / f) for f in ("loss.csv", "probe.csv", "model")]


def test_train_writes_a_checkpoint_that_reloads_to_identical_outputs(tmp_path):
    meta = run_train(TrainSpec(placement="residual", **TINY), tmp_path)
    assert meta["steps_done"] == 6 and meta["diverged_at_step"] is None
    with open(tmp_path / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert [r["val_loss"] != "" for r in rows] == [False, False, True, False, False, True]
    probe_rows = read_sink(tmp_path / "probe.csv").rows
    assert sorted({r["step"] for r in probe_rows}) == [
        0,
        2,
        4,
    ]  # every second step (update ratios: labelled by their step)
    assert {"param_grad_norm", "act_grad_norm", "w2_grad_norm", "cos_adjacent", "update_ratio"} <= {
        r["metric"] for r in probe_rows
    }
    # forward statistics on the first and the last recorded step (and every 10th: none here)
    assert {r["step"] for r in probe_rows if r["metric"] == "cos_adjacent"} == {0, 4}
    assert meta["instability_events"] == []  # a quiet run
    # attn_logits on every recorded step (the precursor monitor's resolution), log Z too
    for metric in ("attn_logit_max", "attn_entropy", "logit_z_mean"):
        assert {r["step"] for r in probe_rows if r["metric"] == metric} == {0, 2, 4}
    assert meta["precursors"] == []  # a quiet run: no attention logit near 50 in 6 steps

    # Train the same model again in memory, identically seeded, and compare outputs.
    torch.manual_seed(0)
    reloaded = load_model(tmp_path / "model")
    batch = BatchSource("decoder", 2, 16, 256, seed=5).next()
    spec = TrainSpec(placement="residual", **TINY)
    again = run_train(spec, tmp_path / "again")
    twin = load_model(tmp_path / "again" / "model")
    assert torch.equal(reloaded(*batch.inputs), twin(*batch.inputs))
    assert again["final_val_loss"] == pytest.approx(meta["final_val_loss"])
    assert (tmp_path / "loss.png").stat().st_size > 5000
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved["model_config"]["placement"] == "residual" and saved["interrupted"] is False


def test_reloaded_checkpoint_equals_the_trained_model(tmp_path, monkeypatch):
    """The in-memory model at the end of training and its saved checkpoint give the same logits."""
    import residual_probe.checkpoints as ckpt

    captured = {}
    real_save = ckpt.save_model

    def spy(model, path):
        captured["model"] = model
        return real_save(model, path)

    monkeypatch.setattr(ckpt, "save_model", spy)
    run_train(TrainSpec(placement="post-ln", **TINY), tmp_path)
    batch = BatchSource("decoder", 2, 16, 256, seed=3).next()
    model = captured["model"].eval()
    with torch.no_grad():
        assert torch.equal(model(*batch.inputs), load_model(tmp_path / "model")(*batch.inputs))


def test_interrupt_keeps_everything_written(tmp_path, monkeypatch):
    import residual_probe.training as train_mod

    calls = {"n": 0}
    real = train_mod.lm_losses

    def interrupting(model, batch, *rest):
        calls["n"] += 1
        if calls["n"] >= 4 and model.training:
            raise KeyboardInterrupt
        return real(model, batch, *rest)

    monkeypatch.setattr(train_mod, "lm_losses", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_train(TrainSpec(placement="pre-ln", **TINY), tmp_path)
    meta = json.loads((tmp_path / "train.json").read_text())
    assert meta["interrupted"] is True
    assert len(list(csv.DictReader(open(tmp_path / "loss.csv")))) >= 2
    # the saved model is the trained one: as many Adam updates as train.json says, reloading to equal weights
    saved = load_model(tmp_path / "model")
    assert meta["model_updates"] >= meta["steps_done"] >= 2
    assert saved.cfg.placement == "pre-ln" and saved.cfg.depth == TINY["depth"]
    fresh = load_model(tmp_path / "model")
    assert all(
        torch.equal(a, b) for a, b in zip(saved.state_dict().values(), fresh.state_dict().values())
    )
    torch.manual_seed(0)
    from residual_probe.models import Transformer

    init = Transformer(saved.cfg)  # the same seed's initialization: training moved the weights
    assert not torch.equal(
        init.decoder.layers[0].ffn.fc1.weight, saved.decoder.layers[0].ffn.fc1.weight
    )
    assert (tmp_path / "probe.csv").stat().st_size > 0


def test_lr_schedule():
    assert lr_schedule(0, 1e-3, 0) == 1e-3
    assert lr_schedule(0, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_schedule(9, 1e-3, 10) == pytest.approx(1e-3)
    assert lr_schedule(39, 1e-3, 10) == pytest.approx(1e-3 * 0.5)


def test_train_cli_bad_input_is_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["train", "--placement", "postln", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "placement: unknown 'postln'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "train.json").exists()


def test_sparse_forward_schedule():
    from residual_probe.probe import ProbeError
    from residual_probe.probe.schedule import sparse_forward

    rules = sparse_forward(
        ("param_grad_norm", "forward_stats"),
        every=5,
        start=1,
        forward_every=10,
        sparse=("forward_stats",),
        last=995,
    )
    grad = [s for s in range(1000) if rules["param_grad_norm"](s)]
    fwd = [s for s in range(1000) if rules["forward_stats"](s)]
    assert grad == list(
        range(0, 1000, 5)
    )  # the probe of a run starting at step 1 never sees step 0
    assert fwd == [
        0,
        5,
        50,
        100,
        150,
        200,
        250,
        300,
        350,
        400,
        450,
        500,
        550,
        600,
        650,
        700,
        750,
        800,
        850,
        900,
        950,
        995,
    ]
    with pytest.raises(ProbeError, match="forward_every"):
        sparse_forward(("forward_stats",), 1, 0, 0, ("forward_stats",))


def test_probe_forward_every_thins_the_quantities_marked_sparse():
    """The Probe's own option: the registry says which quantities are sparse (forward_stats)."""
    from residual_probe.models import ModelConfig, Transformer
    from residual_probe.probe import Probe, ProbeError

    model = Transformer(ModelConfig(arch="decoder", depth=2, d_model=16, heads=2, ffn=32))
    names = ("param_grad_norm", "forward_stats")
    probe = Probe(model, names, every=5, start_step=1, forward_every=10, last_step=995)
    rules = probe.schedule.rules
    assert [s for s in range(60) if rules["param_grad_norm"](s)] == list(range(0, 60, 5))
    assert [s for s in range(1000) if rules["forward_stats"](s)][:4] == [0, 5, 50, 100]
    assert rules["forward_stats"](995) and not rules["forward_stats"](990)
    with pytest.raises(ProbeError, match="forward_every: only with quantities sharing"):
        Probe(model, {"forward_stats": 1}, forward_every=10)
    with pytest.raises(ProbeError, match="forward_every: expected a positive integer"):
        Probe(model, names, forward_every=0)


def test_trainer_run_hears_every_step_and_stops_at_the_first_non_finite_loss():
    """Trainer.run, the loop `train` and the translation study share: after_step hears each step
    with the lr it trained with and its loss, and the run stops after the step whose loss is NaN."""
    from residual_probe.models import ModelConfig, Transformer
    from residual_probe.training import Diverged, Trainer

    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder", depth=2, d_model=16, heads=2, ffn=32, vocab_size=32)
    model = Transformer(cfg)
    trainer = Trainer(model, lr=1e-3, warmup=4)
    batches = BatchSource("decoder", 2, 8, cfg.vocab_size, 0)
    heard = []

    def after_step(step, lr, loss):
        heard.append((step, lr, loss))
        if step == 2:  # the next forward gives NaN
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    stop = trainer.run(batches.next, 10, after_step)
    assert [s for s, _, _ in heard] == [0, 1, 2, 3] and trainer.steps_done == 4
    assert [lr for _, lr, _ in heard] == [lr_schedule(s, 1e-3, 4) for s in range(4)]
    assert isinstance(stop, Diverged) and stop.step == 3 and stop.lr == heard[3][1]
    assert all(math.isfinite(x) for _, _, x in heard[:3]) and math.isnan(stop.loss)
    assert Trainer(Transformer(cfg)).run(batches.next, 2) is None
    # after_step returning True stops the run there (a run trained until a rule holds)
    short = Trainer(Transformer(cfg))
    assert short.run(batches.next, 10, lambda step, lr, loss: step == 4) is None
    assert short.steps_done == 5


def test_train_summary_prints_the_precursor_warnings(capsys):
    """The console summary of `train` names each precursor warning (block, value, rule, remedy)
    after the instability events; a run without any says none."""
    from residual_probe.analysis.precursors import find_precursors
    from residual_probe.cli.render import echo_train

    rows = [
        dict(
            step=s,
            metric="attn_logit_max",
            stack="decoder",
            stream="-",
            layer=1,
            sublayer="block",
            value=v,
        )
        for s, v in ((0, 3.0), (10, 20.0), (20, 75.0))
    ]
    meta = dict(
        diverged=None,
        final_val_loss=2.5,
        steps_done=30,
        wall_seconds=1.0,
        instability_events=[],
        precursors=[p.to_row() for p in find_precursors(rows)],
    )
    echo_train(meta)
    out = capsys.readouterr().out
    assert "instability events: none" in out and "precursor warnings: 1" in out
    assert "step 20: attention-logit growth at decoder block 1" in out and "QK-norm" in out
    echo_train({**meta, "precursors": []})
    assert "precursor warnings: none" in capsys.readouterr().out
