"""`residual-probe figures --quick`: every study runs, writes its figures, and its checks hold.

The asserted agreements are what the quick measurement shows with large margins (seeded); a
claim the measurement contradicts is asserted as contradicted (e.g. Post-LN's vanishing at
initialization is absent from the encoder and from a decoder-only LM).
"""

import csv
import json

import pytest

from residual_probe.studies import STUDIES, StudyError, run_all


@pytest.fixture
def quick(quick_figures):
    return quick_figures


def agreement(meta, study, statement, setting_part="", placement=None):
    found = [
        c
        for c in meta["checks"]
        if c["study"] == study
        and c["statement"].startswith(statement)
        and setting_part in c["setting"]
        and (placement is None or c["placement"] == placement)
    ]
    assert found, (study, statement, setting_part)
    return [c["agreement"] for c in found]


def test_every_study_writes_its_figures_and_checks(quick):
    out, meta = quick
    assert meta["studies"] == list(STUDIES)
    for name in (
        "grad_norms_depths",
        "bounds_theorem1",
        "bounds_lemma2",
        "bounds_adam",
        "training_study_loss",
        "training_study_grads",
        "training_study_collapse",
        "collapse_theory",
        "instability_lr",
        "instability_logits",
        "all_placements_init",
        "all_placements_training",
    ):
        assert (out / f"{name}.png").stat().st_size > 20_000, name
    rows = list(csv.DictReader(open(out / "checks.csv")))
    assert {r["study"] for r in rows} == set(STUDIES)
    assert json.loads((out / "checks.json").read_text())["quick"] is True


def test_gradient_vanishing_is_where_the_measurement_puts_it(quick):
    _, meta = quick
    a = "grad_norms_depths"
    assert agreement(meta, a, "Post-LN gradients vanish toward the input", "seq2seq decoder") == [
        "yes"
    ]
    assert agreement(meta, a, "Post-LN vanishing grows with depth") == ["yes"]
    assert agreement(meta, a, "Post-LN gradients vanish toward the input", "seq2seq encoder") == [
        "no"
    ]
    assert agreement(meta, a, "Post-LN gradients vanish toward the input", "decoder-only LM") == [
        "no"
    ]
    assert agreement(meta, a, "ResiDual keeps a gradient floor") == ["yes"]
    assert agreement(meta, a, "Pre-LN's lower blocks get larger gradients") == ["yes"]


def test_theory_statements(quick):
    _, meta = quick
    a = "theory_bounds"
    assert set(agreement(meta, a, "Xiong L2: Post-LN")) == {"yes"}
    assert agreement(meta, a, "Xiong L2: Pre-LN", "xiong") == ["yes"]
    assert agreement(meta, a, "Xiong T1: post-ln", "xiong") == ["yes"]
    assert set(agreement(meta, a, "ResiDual collapse (toy")) == {"yes"}
    # quick is depth 24: the decoder's gradients stay above eps/1000, where alpha sqrt(d)/eps is not yet reached
    assert set(agreement(meta, a, "ResiDual: Adam")) == {"no: no block in the vanishing regime"}
    assert set(
        agreement(meta, a, "ResiDual collapse closed form with the model's own update sizes")
    ) == {"yes"}
    assert set(agreement(meta, a, "ResiDual: residual per-block gradient bounded below")) == {"yes"}


def test_collapse_and_training(quick):
    _, meta = quick
    assert agreement(meta, "collapse_theory", "Collapse closed forms match") == ["yes"]
    assert agreement(meta, "collapse_theory", "Pre-LN adjacent cosine tends to 1") == ["yes"]
    assert agreement(meta, "collapse_theory", "Post-LN adjacent cosine is constant") == ["yes"]
    assert agreement(
        meta, "collapse_theory", "Pre-LN closed form with the model's own update sizes"
    ) == ["yes"]
    assert agreement(meta, "training_study", "Pre-LN trains without warm-up") == ["yes"]
    assert agreement(meta, "training_study", "ResiDual trains with and without warm-up") == ["yes"]
    assert agreement(meta, "training_study", "Pre-LN's later layers add little") == ["yes"]


def test_unknown_study_is_a_clear_error(tmp_path):
    with pytest.raises(StudyError, match="unknown study 'nope'; choose from grad_norms_depths"):
        run_all(tmp_path, quick=True, only=("nope",))


def test_all_placements_covers_the_registry(quick):
    """Every registered placement at init; the runs' table per placement, mHC's gain at 1."""
    import pandas as pd

    from residual_probe.models import PLACEMENTS
    from residual_probe.studies.all_placements import QUICK_TRAINED

    out, meta = quick
    init = pd.read_csv(out / "all_placements_init.csv")
    assert sorted(init.placement.unique()) == sorted(PLACEMENTS)
    assert set(init["stack"]) == {"encoder", "decoder"}
    assert (init.groupby(["placement", "stack"]).depth.count() == init.depth.nunique()).all()
    runs = pd.read_csv(out / "all_placements_training.csv").set_index(["placement", "warmup"])
    assert {p for p, _ in runs.index} == {p for p in QUICK_TRAINED if p in PLACEMENTS}
    assert abs(runs.loc[("mhc", 0), "hc_gain_fwd"] - 1) < 1e-3
    assert runs.loc[("hc", 0), "hc_gain_fwd"] > 1  # moved off the identity already
    assert runs.loc[("pre-ln", 0), "hc_gain_fwd"] != runs.loc[("pre-ln", 0), "hc_gain_fwd"]  # NaN
    assert agreement(meta, "all_placements", "mHC's Amax gain stays near 1")
    assert agreement(
        meta, "all_placements", "gradients keep a floor toward the input", "", "pre-ln"
    )
