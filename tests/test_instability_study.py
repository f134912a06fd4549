"""The instability study's judgement (studies.instability.judge / checks): which runs fail, when,
how long before the first precursor warned, and which quiet runs raised a false alarm."""

import math

from residual_probe.studies.instability import MARGIN, checks, judge


def run(variant, lr, curve, precursors=(), diverged=None, seed=0, steps=100, logit=10.0):
    return {
        "spec": dict(variant=variant, lr=lr, seed=seed, steps=steps),
        "name": f"{variant} lr {lr:g} seed {seed}",
        "curve": curve,
        "diverged_at_step": diverged,
        "final_val_loss": curve[max(curve)],
        "logit_max": {0: 3.0, 50: logit},
        "entropy_min": {0: 3.0},
        "log_z": {0: 5.0, 50: 5.5},
        "precursors": [
            dict(step=s, metric="attn_logit_max", stack="decoder", layer=0) for s in precursors
        ],
        "events": [],
    }


STEPS = (0, 25, 50, 75, 99)
BEST = dict(zip(STEPS, (5.0, 3.0, 2.6, 2.4, 2.3)))


def test_failure_step_lead_and_false_alarms():
    runs = [
        run("baseline", 1e-3, BEST),  # the best run
        # ahead early, then behind by more than the margin from step 75: last within at 50
        run("baseline", 3e-2, dict(zip(STEPS, (4.9, 2.9, 2.65, 2.6, 2.6))), [20], logit=500.0),
        # within the margin at the end: not failing, yet it warned (a false alarm)
        run("qk-norm", 3e-2, dict(zip(STEPS, (5.0, 3.0, 2.65, 2.45, 2.35))), [60]),
        # diverged at step 30: fails there, its warning at step 10
        run("baseline", 1e-1, {0: 4.9, 25: 3.0, 30: math.nan}, [10], diverged=30, logit=900.0),
    ]
    rows = {(r["variant"], r["lr"]): r for r in judge(runs)}
    best = rows["baseline", 1e-3]
    assert not best["failed"] and best["failure_step"] is None and best["lead_steps"] is None
    high = rows["baseline", 3e-2]
    assert high["failed"] and high["failure_step"] == 50
    assert (high["first_precursor_step"], high["lead_steps"], high["lead_share"]) == (20, 30, 0.3)
    quiet = rows["qk-norm", 3e-2]
    assert not quiet["failed"] and quiet["precursors"] == 1 and quiet["lead_steps"] is None
    gone = rows["baseline", 1e-1]
    assert gone["failed"] and gone["failure_step"] == 25 and gone["lead_steps"] == 15
    found = {c.statement: c for c in checks(list(rows.values()), "toy")}
    lead = found["Precursors warn at least 20% of the run before a high-lr failure"]
    assert lead.agreement == "no" and "1/2 on time" in lead.measured  # 15 of 100 steps < 20 %
    alarms = found["Precursors raise few false alarms"]
    assert alarms.agreement == "no" and "1 of 2 non-failing runs warned" in alarms.measured
    assert MARGIN == 0.1
