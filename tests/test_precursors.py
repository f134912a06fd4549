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


def row(step, metric, value, layer=0, stack="decoder", head="", sublayer=None):
    return dict(
        step=step,
        metric=metric,
        stack=stack,
        stream="-",
        layer=layer,
        sublayer=sublayer or ("head" if stack == "model" else "block"),
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


def test_a_blocks_per_module_rows_are_left_to_its_pooled_row():
    """A seq2seq decoder block has rows per attention module (self_attn, cross_attn) beside its
    pooled `block` row: the block warns once, from the pooled row."""
    rows = []
    for s, v in enumerate([4.0, 60.0, 90.0]):
        rows += [row(s, "attn_logit_max", v, sublayer=sub) for sub in ("block", "self_attn")]
        rows.append(row(s, "attn_logit_max", 4.0, sublayer="cross_attn"))
    rows.append(row(3, "attn_logit_max", 70.0, layer=1, sublayer="cross_attn"))  # no pooled row
    (p,) = find_precursors(rows)
    assert (p.step, p.layer, p.value) == (1, 0, 60.0)


def test_plot_draws_attention_and_lists_the_precursors(tmp_path, monkeypatch):
    """`plot` of a sink whose block 1 attention logits pass 50 at step 40: summary.json lists the
    warning under `precursors` (its series in `metric`), attention.png draws every block's max
    logit with the limit and each block's entropy, and the console names the warning."""
    import csv
    import json

    from typer.testing import CliRunner

    from residual_probe.cli import app
    from residual_probe.plots import run as plots

    rows = []
    for step in range(0, 60, 10):
        for layer in range(3):
            grow = layer == 1
            for metric, value in (
                ("param_grad_norm", 1.0 + 0.01 * step),
                ("attn_logit_max", 4.0 * 2.2 ** (step / 10) if grow else 5.0),
                ("attn_entropy", 3.0 - (0.04 * step if grow else 0.0)),
            ):
                rows.append(
                    dict(
                        step=step,
                        stack="decoder",
                        layer=layer,
                        sublayer="block",
                        stream="-" if metric.startswith("attn") else "x",
                        metric=metric,
                        value=value,
                    )
                )
        rows.append(
            dict(
                step=step,
                stack="model",
                layer=-1,
                sublayer="head",
                stream="-",
                metric="logit_z_mean",
                value=5.0,
            )
        )
    with open(tmp_path / "probe.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    drawn, save = {}, plots.save

    def keep(fig, stem, formats):
        if stem.name == "attention":
            drawn["top"] = [ln.get_label() for ln in fig.axes[0].get_lines()]
            drawn["bottom"] = [ln.get_label() for ln in fig.axes[1].get_lines()]
        return save(fig, stem, formats)

    monkeypatch.setattr(plots, "save", keep)
    result = CliRunner().invoke(
        app, ["plot", str(tmp_path / "probe.csv"), "--out", str(tmp_path / "p")]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    (p,) = summary["precursors"]
    assert (p["metric"], p["layer"], p["step"]) == ("attn_logit_max", 1, 40)  # 4 x 2.2^4 = 94
    assert (tmp_path / "p" / "attention.png").stat().st_size > 5000
    assert {"block 0", "block 1", "block 2", f"limit {ATTN_LOGIT_LIMIT:g}"} <= set(drawn["top"])
    assert {"block 0", "block 1", "block 2"} <= set(drawn["bottom"])
    assert "precursor warnings: 1" in result.stdout and "decoder block 1" in result.stdout
