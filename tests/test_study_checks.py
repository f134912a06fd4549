"""The studies' check logic on their own tables: recomputable without retraining, and able to fail."""

import csv

from residual_probe.studies.collapse_theory import previous_trained_rows
from residual_probe.studies.training_study import summary_checks

FIELDS = (
    "placement",
    "warmup",
    "final_val_loss",
    "diverged_at_step",
    "wall_seconds",
    "grad_ratio_first_step",
    "grad_ratio_last_step",
    "influence_lower_half",
    "influence_upper_half",
)


def table(changes=None):
    base = {
        ("post-ln", 0): (3.11, 0.82, 8e-10, 0.20, 0.18),
        ("post-ln", 100): (3.11, 0.82, 2e-7, 0.20, 0.19),
        ("pre-ln", 0): (1.51, 2.4, 9.3, 0.06, 0.006),
        ("pre-ln", 100): (1.51, 2.4, 7.1, 0.054, 0.009),
        ("residual", 0): (1.76, 1.1, 3.0, 0.21, 0.17),
        ("residual", 100): (1.77, 1.1, 1.8, 0.15, 0.19),
    }
    base.update(changes or {})
    return [
        dict(zip(FIELDS, (p, str(w), *(str(v) for v in (loss, 1, 100, r0, r1, lo, up)))))
        for (p, w), (loss, r0, r1, lo, up) in (
            (k, (v[0], v[1], v[2], v[3], v[4])) for k, v in base.items()
        )
    ]


def verdicts(rows):
    return {c.statement: c.agreement for c in summary_checks(rows)}


def test_training_study_checks_from_its_csv_text():
    v = verdicts(table())
    assert v["Pre-LN trains without warm-up"] == "yes"
    assert v["ResiDual trains with and without warm-up"] == "yes"
    assert v["Post-LN develops vanishing gradients during training without warm-up"] == "yes"
    assert v["Pre-LN's later layers add little (block influence 1 - cos)"] == "yes"
    assert v["Post-LN fails to train deep without warm-up"] == "no"


def test_training_study_checks_can_fail():
    # Pre-LN without warm-up 0.3 nats worse than with: the old "< ln 256 - 1" criterion still said yes
    assert (
        verdicts(table({("pre-ln", 0): (1.81, 2.4, 9.3, 0.06, 0.006)}))[
            "Pre-LN trains without warm-up"
        ]
        == "no"
    )
    # a ratio that merely dips (0.82 -> 0.5) is not vanishing
    v = verdicts(table({("post-ln", 0): (3.11, 0.82, 0.5, 0.20, 0.18)}))
    assert v["Post-LN develops vanishing gradients during training without warm-up"] == "no"
    # upper-half influence 0.05 vs lower 0.06: not "adds little"
    v = verdicts(table({("pre-ln", 100): (1.51, 2.4, 7.1, 0.06, 0.05)}))
    assert v["Pre-LN's later layers add little (block influence 1 - cos)"] == "no"


def test_previous_trained_rows(tmp_path):
    path = tmp_path / "collapse_theory.csv"
    assert previous_trained_rows(path) == []
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("source", "placement", "layer", "metric", "value"))
        w.writerow(("model at init", "pre-ln", 0, "cos_adjacent", 0.9))
        w.writerow(("trained (warm-up)", "pre-ln", 3, "cos_adjacent", 0.99))
    assert previous_trained_rows(path) == [
        {
            "source": "trained (warm-up)",
            "placement": "pre-ln",
            "layer": 3,
            "metric": "cos_adjacent",
            "value": 0.99,
        }
    ]
