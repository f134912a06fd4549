"""Fuzz pass over the probe sinks' reader (`residual-probe plot`, probe.records.read_sink / run_plot):
truncated, bit-flipped, spliced and random-byte CSV/JSONL files, and well-formed rows with hostile
values (NaN, inf, huge or negative layers and steps, unknown stacks and metrics), end in the
documented `SinkError`/`PlotError` (one line, exit 2) or are read and drawn; never another exception or a hang.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz_checkpoints import mutations, no_hang

from residual_probe.jobs.plot import PlotError, run_plot
from residual_probe.models import ModelConfig, Transformer
from residual_probe.probe import Probe
from residual_probe.probe.records import SinkError, read_sink

DEEP = int(os.environ.get("FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=DEEP or 40,
    deadline=None,
    derandomize=not DEEP,
    database=None,
    suppress_health_check=list(HealthCheck),
)
DRAWN = settings(FUZZ, max_examples=DEEP or 5)  # each example draws the figures


@pytest.fixture(scope="module")
def sinks(tmp_path_factory):
    """probe.jsonl and probe.csv of three recorded steps of a tiny ResiDual model."""
    root = tmp_path_factory.mktemp("sinks")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            arch="decoder", placement="residual", depth=3, d_model=8, heads=2, ffn=16, vocab_size=32
        )
    )
    for name in ("probe.jsonl", "probe.csv"):
        probe = Probe(
            model,
            quantities=("param_grad_norm", "act_grad_norm", "forward_stats"),
            sink=root / name,
        )
        with probe:
            for step in range(3):
                tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(step))
                model(tokens).logsumexp(-1).mean().backward()
                probe.step()
                model.zero_grad(set_to_none=True)
    for name in ("probe.jsonl", "probe.csv"):
        assert len(read_sink(root / name).rows) > 50
    return root


def read_or_plot_error(path: Path) -> str:
    try:
        with no_hang():
            sink = read_sink(path)
    except (PlotError, SinkError) as exc:
        assert str(exc) and "\n" not in str(exc)
        return "error"
    assert all(
        set(r) == {"step", "stack", "layer", "sublayer", "stream", "metric", "value"}
        for r in sink.rows
    )
    return "read"


@pytest.mark.parametrize("name", ["probe.jsonl", "probe.csv"])
def test_damaged_sink_files(sinks, tmp_path_factory, name):
    data = (sinks / name).read_bytes()
    scratch = tmp_path_factory.mktemp("mut") / name
    outcomes = []

    @FUZZ
    @given(mutations(data))
    def check(mutant):
        scratch.write_bytes(mutant)
        outcomes.append(read_or_plot_error(scratch))

    check()
    assert "error" in outcomes and "read" in outcomes


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
VALUES = st.one_of(
    finite, st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.floats(0, 10)
)
ROWS = st.fixed_dictionaries(
    {
        "step": st.one_of(st.integers(0, 5), st.integers(-(10**12), 10**12)),
        "stack": st.sampled_from(["decoder", "encoder", "", "layers", "x" * 200]),
        "layer": st.one_of(st.integers(0, 4), st.integers(-(10**9), 10**9)),
        "sublayer": st.sampled_from(["block", "self_attn", "ffn", "group:attention", ""]),
        "stream": st.sampled_from(["x", "d", "-", "z"]),
        "metric": st.sampled_from(
            [
                "param_grad_norm",
                "act_grad_norm",
                "cos_adjacent",
                "block_influence",
                "w2_grad_norm",
                "nonfinite_count",
                "made_up",
            ]
        ),
        "value": VALUES,
    }
)


@given(rows=st.lists(ROWS, min_size=1, max_size=40), fmt=st.sampled_from(["jsonl", "csv"]))
@DRAWN
def test_hostile_rows_are_read_and_drawn_or_refused(tmp_path_factory, rows, fmt):
    folder = tmp_path_factory.mktemp("rows")
    sink = folder / f"probe.{fmt}"
    if fmt == "jsonl":
        sink.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        cols = ("step", "stack", "layer", "sublayer", "stream", "metric", "value")
        sink.write_text(
            ",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows)
        )
    try:
        with no_hang(60):
            summary = run_plot(sink, folder / "out")
    except (PlotError, SinkError) as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert Path(summary["files"][-1]).is_file()


def test_the_cli_answers_a_damaged_sink_with_one_line_and_exit_2(sinks, tmp_path):
    from typer.testing import CliRunner

    from residual_probe.cli import app

    data = (sinks / "probe.jsonl").read_bytes()
    cases = {
        "binary.jsonl": b"\xff\xfe" + data[:200],
        "cut.csv": (sinks / "probe.csv").read_bytes()[:10],
        "junk.jsonl": b'{"step": 1}\n',
        "empty.csv": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        result = CliRunner().invoke(
            app, ["plot", str(tmp_path / name), "--out", str(tmp_path / "out")]
        )
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
            name,
            result.output,
        )
        assert not (tmp_path / "out").exists()  # nothing created for a run that failed on its input
