"""The translation study's runs to the convergence rule, and the intervals of its claims: the
seed-mean bootstrap and, where a run hit its cap, the fitted asymptotes."""

import math

import numpy as np
import pytest

from residual_probe.analysis import regime, significance
from residual_probe.studies.translation import checks as C
from residual_probe.studies.translation import runs as R


def test_a_run_stops_at_the_first_bleu_point_where_the_rule_holds(tmp_path, monkeypatch):
    import dataclasses

    spec = R.RunSpec("pre-ln", 1, True, **{**R.common(True), **R.to_convergence(True)})
    assert (spec.min_steps, spec.steps) == (10, 20) and spec.name.endswith("-to-rule")
    spec = dataclasses.replace(spec, min_steps=5, eval_every=5, bleu_every=10)
    seen = []

    def rule(curve):  # holds from step 5 on: checked first at the BLEU point 10, where it stops
        seen.append(curve[-1]["step"])
        return curve[-1]["step"] >= 5

    monkeypatch.setattr(R.regime, "converged", rule)
    res = R.train_run(spec, tmp_path / spec.name)
    assert res["steps_done"] == 10 and res["converged"] and res["diverged_at_step"] is None
    assert seen == [10, 10]  # the stop, then the result's flag; never at the evaluation 5
    curve = R.read_rows(tmp_path / spec.name / "curve.csv")
    assert [int(r["step"]) for r in curve] == [0, 5, 10]
    assert [r["bleu"] != "nan" for r in curve] == [True, False, True]
    assert float(curve[-1]["bleu"]) == pytest.approx(res["bleu"])


def test_the_rule_reads_window_means_not_a_blip():
    """A held-out loss that has levelled off with one upward blip at the end: a rule on single
    evaluations would stop there (no improvement), the window means see the improvement."""
    steps = range(0, 5001, 100)
    loss = [1.0 / (1 + s / 500) for s in steps]
    curve = [dict(step=s, heldout_loss=v) for s, v in zip(steps, loss)]
    assert not regime.converged(curve)  # still falls ~14 % over the last 20 %
    blip = curve[:-1] + [dict(step=5000, heldout_loss=loss[-11])]  # back to the step-4000 level
    single = regime.tail_improvement(blip, window=1)
    assert single < 0.01 and not regime.converged(blip)


def test_inverse_sqrt_schedule_does_not_depend_on_the_budget():
    """Why a run stopped by the rule at step s is the s-step run: the lr at a step never reads
    the number of steps planned."""
    from residual_probe.training import lr_schedule

    assert "steps" not in lr_schedule.__code__.co_varnames[: lr_schedule.__code__.co_argcount]


def _systems(seed):
    from test_translation_study import _clustered

    return _clustered(seed=seed, sentences=20, per=3)


def test_seed_mean_interval_with_one_seed_is_the_sentence_interval():
    good, bad, refs, clusters = _systems(0)
    one = significance.seed_mean_interval([good], [bad], refs, clusters)
    assert one.low < one.diff < one.high
    direct = significance.cluster_bootstrap(good, bad, refs, clusters)
    assert (one.diff, one.low, one.high) == pytest.approx((direct.diff, direct.low, direct.high))
    # two seeds with the same decodes: nothing more to resample
    two = significance.seed_mean_interval([good, good], [bad, bad], refs, clusters)
    assert (two.low, two.high) == pytest.approx((one.low, one.high))


def test_seed_mean_interval_widens_when_seeds_disagree():
    _, bad, refs, clusters = _systems(1)
    good = list(refs)  # a perfect system: d about 50 BLEU, far beyond the sentence noise
    same = significance.seed_mean_interval([good, good], [bad, bad], refs, clusters)
    mixed = significance.seed_mean_interval([good, bad], [bad, good], refs, clusters)
    assert mixed.diff == pytest.approx(0.0, abs=1e-9)  # +d and -d
    assert mixed.low < 0 < mixed.high and mixed.high - mixed.low > same.high - same.low


def test_asymptote_recovers_a_known_level():
    t = np.arange(0, 6001, 500)
    v = 80 - 40 * np.exp(-t / 2500) + np.random.default_rng(0).normal(0, 0.3, len(t))
    a, se = regime.asymptote(t, v)[:2]
    assert abs(a - 80) < 3 * se + 0.5 and se < 5
    assert regime.asymptote([1000, 1500, 2000, 4000], [1, 2, 3, 4]) is None  # 2 in the last half


def test_fitted_difference_interval():
    mean, low, high = significance.fitted_difference_interval([(80, 0.0)] * 3, [(70, 0.0)] * 3)
    assert (mean, low, high) == pytest.approx((10, 10, 10))
    mean, low, high = significance.fitted_difference_interval([(80, 2.0)] * 3, [(79, 2.0)] * 3)
    assert low < 1 < high
    assert math.isnan(significance.fitted_difference_interval([(1, math.inf)], [(0, 0)])[1])


def _run(placement, seed, level, converged):
    spec = R.RunSpec(placement, 2, True, seed=seed, min_steps=3000, steps=6000)
    t = np.arange(0, 6001, 500)
    bleu = level - 50 * np.exp(-t / 2000) + 0.2 * ((t // 500) % 2)  # a little noise
    res = dict(
        spec=dict(depth=2, placement=placement, warmup=True, lr=1e-3, alpha=1.0, seed=seed)
        | dict(min_steps=3000),
        name=spec.name,
        steps_done=6000,
        converged=converged,
        diverged_at_step=None,
        heldout_loss=0.5,
        bleu=float(bleu[-1]),
        hypotheses=["x"],
    )
    return res, [dict(step=float(s), bleu=float(b)) for s, b in zip(t, bleu)]


def test_claim_rows_extrapolate_where_the_cap_was_hit():
    made = [_run("residual", s, 90, False) for s in range(3)]
    made += [_run("pre-ln", s, 85, True) for s in range(3)]
    cells = C.Cells([r for r, _ in made], ["x"], 4.4, 5.3, curves={r["name"]: c for r, c in made})
    a, b = (2, "residual", True, 1e-3), (2, "pre-ln", True, 1e-3)
    row = C.compare(cells, "A > B", "tiny", "residual", "paper", a, b)
    assert (
        row.measured.startswith("extrapolated (cap hit: E2D2-residual")
        and "at the stop" in row.measured
    )
    assert row.agreement == "yes"  # asymptotes 90 vs 85, fitted tightly
    # every run levelled off: the measured verdict stands, nothing extrapolated
    done = [(dict(r, converged=True), c) for r, c in made]
    cells = C.Cells([r for r, _ in done], ["x"], 4.4, 5.3, curves={r["name"]: c for r, c in done})
    row = C.compare(cells, "A > B", "tiny", "residual", "paper", a, b)
    assert "extrapolated" not in row.measured and row.agreement == "not resolved"


def _capped(**kw):
    import dataclasses

    spec = R.RunSpec("residual", 1, True, **{**R.common(True), **R.to_convergence(True)})
    return dataclasses.replace(spec, min_steps=5, steps=10, eval_every=5, bleu_every=5, **kw)


def test_a_higher_cap_goes_on_from_the_lower_caps_state_and_equals_one_run(tmp_path, monkeypatch):
    """A run that hit its cap, given a higher one, continues from its saved state: every record
    (curve, probe, ResiDual's streams, decodes) equals the run trained to the higher cap at once."""
    import dataclasses

    monkeypatch.setattr(R.regime, "converged", lambda curve: False)
    low = _capped()
    assert R.train_run(low, tmp_path / "a" / low.name)["steps_done"] == 10
    high = dataclasses.replace(low, steps=20)
    assert R.load_result(high, tmp_path / "a") is None  # another spec: not simply reused
    straight = R.train_run(high, tmp_path / "b" / high.name)
    resumed = R.train_run(high, tmp_path / "a" / high.name)
    assert resumed["steps_done"] == straight["steps_done"] == 20
    assert resumed["spec"]["steps"] == 20 and resumed["hypotheses"] == straight["hypotheses"]
    assert resumed["heldout_loss"] == straight["heldout_loss"]
    a, b = tmp_path / "a" / high.name, tmp_path / "b" / high.name
    for f in ("curve.csv", "probe.csv", "streams.csv"):
        assert (a / f).read_text() == (b / f).read_text(), f
    assert len(R.read_rows(a / "curve.csv")) == 5  # steps 0, 5, 10, 15, 20: nothing twice


def test_an_interrupted_run_goes_on_from_its_last_bleu_point_and_equals_one_run(
    tmp_path, monkeypatch
):
    import dataclasses

    spec = dataclasses.replace(_capped(), steps=20)

    def interrupt_at_15(curve):
        if curve[-1]["step"] == 15:
            raise KeyboardInterrupt  # a kill between the BLEU points 10 and 15
        return False

    monkeypatch.setattr(R.regime, "converged", interrupt_at_15)
    with pytest.raises(KeyboardInterrupt):
        R.train_run(spec, tmp_path / "a" / spec.name)
    import torch

    state = torch.load(tmp_path / "a" / spec.name / R.STATE, weights_only=True)
    assert state["steps_done"] == 10 and not (tmp_path / "a" / spec.name / "result.json").exists()
    monkeypatch.setattr(R.regime, "converged", lambda curve: False)
    resumed = R.train_run(spec, tmp_path / "a" / spec.name)
    straight = R.train_run(spec, tmp_path / "b" / spec.name)
    assert resumed["steps_done"] == straight["steps_done"] == 20
    assert resumed["hypotheses"] == straight["hypotheses"]
    a, b = tmp_path / "a" / spec.name, tmp_path / "b" / spec.name
    for f in ("curve.csv", "probe.csv", "streams.csv"):
        assert (a / f).read_text() == (b / f).read_text(), f


def test_a_higher_cap_ends_where_the_lower_cap_run_stopped_or_where_the_rule_holds(
    tmp_path, monkeypatch
):
    import dataclasses

    # the rule held at 5, before the cap 10: a cap of 20 ends there too, without training
    monkeypatch.setattr(R.regime, "converged", lambda curve: curve[-1]["step"] >= 5)
    early = _capped()
    assert R.train_run(early, tmp_path / early.name)["steps_done"] == 5
    higher = dataclasses.replace(early, steps=20)
    again = R.train_run(higher, tmp_path / higher.name)
    assert again["steps_done"] == 5 and again["spec"]["steps"] == 20
    assert R.load_result(higher, tmp_path) == again
    # a run that hit the cap 10, where the rule (never checked at a cap) holds: stops at 10
    monkeypatch.setattr(R.regime, "converged", lambda curve: curve[-1]["step"] >= 10)
    capped = _capped(seed=1)
    assert R.train_run(capped, tmp_path / capped.name)["steps_done"] == 10
    higher = dataclasses.replace(capped, steps=20)
    assert R.train_run(higher, tmp_path / higher.name)["steps_done"] == 10


def test_a_level_the_data_do_not_determine_is_not_identified():
    """A straight rise fits any level past the points (here pinned at the bound 100), and a flat
    curve near 1 (Post-LN E12D12 seed 1's) may run to the bound too: neither decides a verdict."""
    t = np.arange(3000, 6001, 500)
    bent = regime.asymptote(t, 80 - 40 * np.exp(-t / 1000), upper=100.0)
    assert bent.identified and bent.why_not() == "" and abs(bent.level - 80) < 0.1
    line = regime.asymptote(t, 60 + t / 1000, upper=100.0)
    assert not line.identified and line.why_not()
    fit = regime.Asymptote(90.0, 1.0, 9000.0, 3000.0, 100.0)
    assert not fit.identified and fit.why_not() == "tau 9000 steps > the 3000 fitted"
    assert regime.Asymptote(99.999, 1.0, 500.0, 3000.0, 100.0).why_not() == "level at its bound 100"


def test_a_claim_row_with_an_unidentified_level_is_not_resolved():
    made = [_run("residual", s, 90, False) for s in range(3)]
    made += [_run("pre-ln", s, 85, True) for s in range(3)]
    res, curve = made[1]
    made[1] = (res, [dict(c, bleu=60 + c["step"] / 1000) for c in curve])  # a straight rise
    cells = C.Cells([r for r, _ in made], ["x"], 4.4, 5.3, curves={r["name"]: c for r, c in made})
    a, b = (2, "residual", True, 1e-3), (2, "pre-ln", True, 1e-3)
    row = C.compare(cells, "A > B", "tiny", "residual", "paper", a, b)
    assert row.agreement == "not resolved"
    assert f"level not identified for {res['name']}" in row.measured
