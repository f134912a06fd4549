"""The compact CSV sink: at most 250 bytes per block per recorded step at the default quantities
(300 with ResiDual's two streams),
appendable (new keys add columns without breaking earlier lines), one `pandas.read_csv` call,
the same rows as `probe.rows()`, and tidy CSVs of earlier versions still read and continued."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from residual_probe.models import build_model
from residual_probe.probe import Probe
from residual_probe.probe.records import COLUMNS, read_sink

DEPTH = 8


def train(probe, model, steps=3, start=0):
    with probe:
        for s in range(start, start + steps):
            tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(s))
            model(tokens).logsumexp(-1).mean().backward()
            probe.step()
            model.zero_grad(set_to_none=True)
    return probe


def key(r):
    return (r["step"], r["stack"], r["layer"], r["sublayer"], r["stream"], r["metric"])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(
        arch="decoder", placement="pre-ln", depth=DEPTH, d_model=32, heads=2, ffn=64, vocab_size=50
    )


def per_block_bytes(sink, steps):
    header = len(sink.read_text().splitlines()[0]) + 1
    return (sink.stat().st_size - header) / steps / DEPTH


def test_residual_two_streams_fit_300_bytes_per_block(tmp_path):
    torch.manual_seed(0)
    model = build_model(
        arch="decoder",
        placement="residual",
        depth=DEPTH,
        d_model=32,
        heads=2,
        ffn=64,
        vocab_size=50,
    )
    train(Probe(model, sink=tmp_path / "probe.csv"), model, steps=2)
    assert per_block_bytes(tmp_path / "probe.csv", 2) <= 300


def test_default_quantities_fit_250_bytes_per_block_and_match_rows(model, tmp_path):
    sink = tmp_path / "probe.csv"
    probe = train(Probe(model, sink=sink), model, steps=4)
    per_block = per_block_bytes(sink, 4)
    assert per_block <= 250, per_block
    tidy = tmp_path / "probe.jsonl"
    train(Probe(model, sink=tidy), model, steps=1)
    assert tidy.stat().st_size / DEPTH > 4 * per_block  # the tidy layout is the large one
    mem = {key(r): r["value"] for r in probe.rows()}
    got = {key(r): r["value"] for r in read_sink(sink).rows}
    assert got.keys() == mem.keys()
    assert all(got[k] == pytest.approx(mem[k], rel=6e-7) for k in mem)
    wide = pd.read_csv(sink)  # one call; a line per (step, stack, layer)
    assert list(wide.columns[:3]) == ["step", "stack", "layer"]
    blocks = wide[wide["stack"] == "decoder"]
    assert len(blocks) == 4 * DEPTH and blocks["cos_adjacent/block/x"].notna().all()
    first = {
        r["layer"]: r["value"]
        for r in probe.rows()
        if r["step"] == 0 and r["metric"] == "param_grad_norm" and r["sublayer"] == "block"
    }
    col = blocks[blocks["step"] == 0].set_index("layer")["param_grad_norm/block/-"]
    assert col.to_dict() == pytest.approx(first, rel=6e-7)
    assert read_sink(sink).frame().columns.tolist() == list(COLUMNS)


def test_a_key_first_seen_later_adds_a_column_and_earlier_lines_stay_valid(model, tmp_path):
    sink = tmp_path / "probe.csv"
    probe = Probe(model, quantities={"param_grad_norm": 1, "forward_stats": [2]}, sink=sink)
    train(probe, model, steps=3)
    header = sink.read_text().splitlines()[0].split(",")
    assert header.index("cos_adjacent/block/x") > header.index(
        "param_grad_norm/total/-"
    )  # added at step 2
    wide = pd.read_csv(sink)
    assert wide.loc[wide["step"] < 2, "cos_adjacent/block/x"].isna().all()
    assert (
        wide.loc[(wide["step"] == 2) & (wide["stack"] == "decoder"), "cos_adjacent/block/x"]
        .notna()
        .all()
    )
    mem = {key(r): r["value"] for r in probe.rows()}
    assert {key(r) for r in read_sink(sink).rows} == mem.keys()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_resumed_run_continues_the_same_file(model, tmp_path):
    sink = tmp_path / "probe.csv"
    train(Probe(model, quantities=("param_grad_norm",), sink=sink), model, steps=2)
    train(
        Probe(model, quantities=("param_grad_norm",), sink=sink, start_step=2),
        model,
        steps=2,
        start=2,
    )
    assert sink.read_text().count("step,stack,layer") == 1
    assert sorted({r["step"] for r in read_sink(sink).rows}) == [0, 1, 2, 3]


def test_an_older_tidy_csv_is_read_and_continued_in_its_layout(model, tmp_path):
    sink = tmp_path / "old.csv"
    sink.write_text(
        ",".join(COLUMNS)
        + "\n0,decoder,0,block,-,param_grad_norm,0.5\n0,decoder,1,block,-,param_grad_norm,nan\n"
    )
    train(
        Probe(model, quantities=("param_grad_norm",), sink=sink, start_step=1),
        model,
        steps=1,
        start=1,
    )
    lines = sink.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and all(len(x.split(",")) == len(COLUMNS) for x in lines)
    rows = read_sink(sink).rows
    assert (
        rows[0]["value"] == 0.5
        and math.isnan(rows[1]["value"])
        and {r["step"] for r in rows} == {0, 1}
    )


def test_a_wide_sink_cut_mid_step_drops_the_incomplete_step(model, tmp_path):
    sink = tmp_path / "probe.csv"
    train(Probe(model, quantities=("param_grad_norm", "forward_stats"), sink=sink), model, steps=3)
    lines = sink.read_text().splitlines(keepends=True)
    last = [i for i, x in enumerate(lines) if x.startswith("2,")]
    cut = tmp_path / "cut.csv"
    cut.write_text(
        "".join(lines[: last[0] + 2]) + lines[last[0] + 2][:20]
    )  # step 2: two blocks and a half line
    read = read_sink(cut)
    assert read.partial_line and {r["step"] for r in read.rows} == {0, 1}
    assert any("step 2 is incomplete" in n for n in read.notes)
