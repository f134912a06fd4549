"""Precursor warnings (analysis.precursors): each rule fires once per block series, at the first
step it holds, and says what it warns of and the field's remedy; quiet series stay quiet."""

import math

import pytest

from residual_probe.analysis.precursors import (
    ATTN_LOGIT_LIMIT,
    ENTROPY_SHARE,
    LOGZ_DRIFT,
    PrecursorMonitor,
    find_precursors,
)


def row(step, metric, value, layer=0, stack="decoder", head=""):
    return dict(
        step=step,
        metric=metric,
        stack=stack,
        stream="x",
        layer=layer,
        sublayer="attn",
        value=value,
        head=head,
    )


def test_attention_logit_growth_fires_once_at_the_first_step_above_the_limit():
    logits = [4.0, 9.0, 17.0, 40.0, 94.0, 280.0, 600.0]  # block 0 of a run at too high an lr
    rows = [row(10 * i, "attn_logit_max", v) for i, v in enumerate(logits)]
    rows += [row(10 * i, "attn_logit_max", 8.0 + i, layer=1) for i in range(7)]  # a quiet block
    (p,) = find_precursors(rows)
    first_above = next(i for i, v in enumerate(logits) if v > ATTN_LOGIT_LIMIT)
    assert (p.step, p.layer, p.value, p.reference) == (10 * first_above, 0, 94.0, ATTN_LOGIT_LIMIT)
    text = p.describe()
    assert "attention-logit growth at decoder block 0" in text and "QK-norm" in text


def test_entropy_collapse_is_relative_to_the_runs_own_start():
    start = 3.88  # the uniform causal value at 128 positions
    healthy = [start, 3.7, 3.5, 3.3, 3.2]  # attention sharpens while the model learns
    collapsing = [start, 3.0, 2.0, 0.92, 0.5]
    rows = [row(i, "attn_entropy", v, layer=0) for i, v in enumerate(healthy)]
    rows += [row(i, "attn_entropy", v, layer=1) for i, v in enumerate(collapsing)]
    (p,) = find_precursors(rows)
    assert p.layer == 1 and p.step == 3 and p.reference == pytest.approx(ENTROPY_SHARE * start)
    assert "attention-entropy collapse" in p.describe() and "0.92" in p.describe()


def test_log_z_drift_either_way_and_non_finite_values():
    rows = [row(s, "logit_z_mean", 5.5 - 1.5 * s, layer=-1, stack="model") for s in range(10)]
    (p,) = find_precursors(rows)
    assert p.step == 7 and abs(p.value - 5.5) > LOGZ_DRIFT and "output logits" in p.describe()
    assert "z-loss" in p.describe()
    nan = find_precursors([row(0, "attn_logit_max", 3.0), row(1, "attn_logit_max", math.nan)])
    assert len(nan) == 1 and nan[0].step == 1 and "nan" in nan[0].describe()


def test_online_updates_equal_one_pass_and_name_the_head():
    rows = [row(s, "attn_logit_max", 10.0 * 2**s, head=str(h)) for s in range(5) for h in (0, 3)]
    online = PrecursorMonitor()
    seen = []
    for s in range(5):
        seen += online.update([r for r in rows if r["step"] == s])
    offline = find_precursors(reversed(rows))
    assert [p.to_row() for p in seen] == [p.to_row() for p in offline]
    assert {p.head for p in seen} == {"0", "3"} and "head 3" in seen[-1].describe()
    assert online.update([row(9, "attn_logit_max", 1e4, head="0")]) == []  # once per series
