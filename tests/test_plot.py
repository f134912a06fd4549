"""`residual-probe plot RUN`: figures and verdicts from real probe sinks, partial and bad input.

The sinks are written by a real `Probe(sink=...)` on the reference models (seq2seq ResiDual
gives two stacks and two streams) and on a Hugging Face GPT-2 config; then cut, emptied or
spoiled by hand to test the edges.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from residual_probe.cli import app
from residual_probe.data import BatchSource
from residual_probe.models import ModelConfig, Transformer
from residual_probe.probe import Probe
from residual_probe.probe.records import read_sink

runner = CliRunner()
QUANTITIES = ("param_grad_norm", "act_grad_norm", "forward_stats")


def write_sink(
    path: Path, arch="seq2seq", placement="residual", steps=4, quantities=QUANTITIES, every=1
):
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch=arch, placement=placement, depth=3, d_model=16, heads=2, ffn=32, max_len=64
    )
    model = Transformer(cfg)
    source = BatchSource(arch, 2, 6, cfg.vocab_size, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = Probe(model, quantities=quantities, every=every, sink=str(path))
    with probe:
        for _ in range(steps):
            b = source.next()
            loss = torch.nn.functional.cross_entropy(
                model(*b.inputs).flatten(0, 1), b.targets.flatten()
            )
            opt.zero_grad()
            loss.backward()
            probe.step()
            opt.step()
    return probe.rows()


def plot(*args):
    result = runner.invoke(app, ["plot", *map(str, args)])
    return result


@pytest.fixture(scope="module")
def seq2seq_sink(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    rows = write_sink(d / "probe.jsonl")
    return d, rows


@pytest.fixture(scope="module")
def seq2seq_plot(seq2seq_sink, tmp_path_factory):
    """`plot` of the whole seq2seq sink, as PNG and PDF: (out folder, CLI result)."""
    out = tmp_path_factory.mktemp("plot")
    return out, plot(
        seq2seq_sink[0], "--out", out, "--placement", "residual", "--format", "png,pdf"
    )


def test_two_stacks_two_streams_figures_and_verdicts(seq2seq_sink, seq2seq_plot):
    run, rows = seq2seq_sink
    tmp_path, r = seq2seq_plot
    assert r.exit_code == 0, r.output
    for name in ("grad_heatmap", "grad_steps", "act_grad", "collapse"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
        assert (tmp_path / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == {"first": 0, "last": 3, "count": 4}
    assert summary["chosen_steps"] == [0, 2, 3]
    assert set(summary["stacks"]) >= {"encoder", "decoder"}
    # ResiDual: the Pre-LN reference belongs to the dual stream d only, not to x
    assert sorted(summary["collapse_reference_drawn_for"]) == ["decoder:d", "encoder:d"]
    # the verdict numbers are the rows' numbers
    last = {
        (x["stack"], x["layer"]): x["value"]
        for x in rows
        if x["step"] == 3 and x["metric"] == "param_grad_norm" and x["sublayer"] == "block"
    }
    for v in summary["gradient_verdicts"]:
        assert v["first_over_last"] == pytest.approx(last[(v["stack"], 0)] / last[(v["stack"], 2)])
        assert f"{v['stack']} step 3: {v['verdict']}" in r.output
    streams = {(c["stack"], c["stream"]) for c in summary["collapse_verdicts"]}
    assert streams == {("encoder", "x"), ("encoder", "d"), ("decoder", "x"), ("decoder", "d")}
    assert "collapse:" in r.output and str(tmp_path / "summary.json") in r.output


def test_hf_gpt2_block_names_csv_and_chosen_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    )
    sink = tmp_path / "gpt2.csv"
    probe = Probe(model, quantities=("param_grad_norm", "forward_stats"), sink=str(sink))
    with probe:
        for s in range(3):
            ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(s))
            model(input_ids=ids, labels=ids).loss.backward()
            probe.step()
    r = plot(sink, "--out", tmp_path / "o", "--steps", "1,2", "--placement", "pre-ln")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["stacks"] == {"transformer.h": 3}
    assert summary["chosen_steps"] == [1, 2]
    assert summary["collapse_reference_drawn_for"] == ["transformer.h"]
    assert any("activation gradients" in m for m in summary["missing"])
    assert "not recorded: act_grad_norm" in r.output
    assert not (tmp_path / "o" / "act_grad.png").exists()
    # a step that was not recorded
    r = plot(sink, "--out", tmp_path / "o2", "--steps", "7")
    assert r.exit_code == 2 and "step 7 was not recorded" in r.output


def test_sink_still_being_written_reads_complete_lines(seq2seq_sink, tmp_path):
    run, rows = seq2seq_sink
    data = (run / "probe.jsonl").read_bytes()
    lines = data.splitlines(keepends=True)
    cut = (
        b"".join(lines[:-3]) + lines[-3][:30]
    )  # mid-line inside the last step's block rows, as a writer may leave it
    sink = tmp_path / "probe.jsonl"
    sink.write_bytes(cut)
    (tmp_path / "train.json").write_text(
        json.dumps({"spec": {"placement": "residual"}})
    )  # as the train job
    complete = [json.loads(line) for line in cut.splitlines()[:-1]]
    last = complete[-1]["step"]
    whole = [x for x in complete if x["step"] != last]  # the last step was cut mid-write: dropped
    got = read_sink(sink)
    assert (
        got.partial_line
        and len(got.rows) == len(whole)
        and f"step {last} is incomplete" in got.notes[0]
    )
    r = plot(tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "incomplete last line" in r.output and f"step {last} is incomplete" in r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["rows"] == len(whole) and summary["steps"]["last"] == last - 1
    assert (summary["placement"], summary["placement_source"]) == ("residual", "from train.json")
    assert sorted(summary["collapse_reference_drawn_for"]) == ["decoder:d", "encoder:d"]


def test_nonfinite_values_are_marked_not_fatal(seq2seq_sink, tmp_path):
    run, rows = seq2seq_sink
    spoiled = []
    for x in rows:
        x = dict(x)
        if (
            x["step"] == 3
            and x["stack"] == "decoder"
            and x["layer"] == 1
            and x["metric"] in ("param_grad_norm", "cos_adjacent", "act_grad_norm")
        ):
            x["value"] = math.nan if x["metric"] != "act_grad_norm" else math.inf
        spoiled.append(x)
    sink = tmp_path / "nan.jsonl"
    sink.write_text("".join(json.dumps(x) + "\n" for x in spoiled))
    r = plot(sink, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["nonfinite"]["count"] > 0 and summary["nonfinite"]["first_step"] == 3
    dec = [v for v in summary["gradient_verdicts"] if v["stack"] == "decoder"][0]
    assert dec["verdict"].startswith("unknown: blocks 1") and math.isnan(dec["first_over_last"])
    assert "non-finite values" in r.output


def test_only_gradients_recorded(tmp_path):
    write_sink(
        tmp_path / "probe.jsonl",
        arch="decoder",
        placement="post-ln",
        quantities=("param_grad_norm",),
    )
    r = plot(tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "o").iterdir() if not p.name.startswith("."))
    assert files == ["grad_heatmap.png", "grad_steps.png", "summary.json"]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert len(summary["missing"]) == 2 and summary["collapse_verdicts"] == []


def bad_cases(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    text = tmp_path / "notes.jsonl"
    text.write_text("hello world\n")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"loss": 1.0}) + "\n")
    csvfile = tmp_path / "x.csv"
    csvfile.write_text("a,b,c\n1,2,3\n")
    txt = tmp_path / "run.txt"
    txt.write_text("x")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    return {
        "missing": (tmp_path / "nope.jsonl", "does not exist"),
        "empty": (empty, "is empty"),
        "not json": (text, "is not JSON"),
        "not a probe row": (other, "is not a probe row"),
        "csv header": (csvfile, "is not a probe sink"),
        "suffix": (txt, "is not a probe sink"),
        "folder without sink": (nothing, "holds no probe sink"),
    }


def test_bad_input_one_line_exit_2_no_files(tmp_path):
    for name, (run, message) in bad_cases(tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        r = plot(run, "--out", out)
        assert r.exit_code == 2, (name, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            name,
            r.stderr,
        )
        assert not out.exists() or not list(out.iterdir()), name


def test_bad_input_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "residual_probe.cli", "plot", str(tmp_path / "none.jsonl")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: '{tmp_path / 'none.jsonl'}' does not exist"
    ]


def test_a_sink_cut_between_blocks_is_judged_on_its_last_complete_step(
    seq2seq_sink, seq2seq_plot, tmp_path
):
    """Only blocks 0-1 of the last step written: the verdict must not read block 1 as the last block."""
    run, rows = seq2seq_sink
    last = max(x["step"] for x in rows)
    head = [x for x in rows if x["step"] < last]
    tail = [x for x in rows if x["step"] == last and x["layer"] <= 1]
    sink = tmp_path / "cut.jsonl"
    sink.write_text("".join(json.dumps(x) + "\n" for x in head + tail))
    r = plot(sink, "--out", tmp_path / "o", "--placement", "residual")
    assert r.exit_code == 0, r.output
    assert f"step {last} is incomplete" in r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert {v["step"] for v in summary["collapse_verdicts"]} == {last - 1}
    full, result = seq2seq_plot
    want = {
        (c["stack"], c["stream"]): c["late_cos_adjacent"]
        for c in json.loads((full / "summary.json").read_text())["collapse_verdicts"]
    }
    assert result.exit_code == 0
    # the same numbers as the uncut sink had at step last - 1 (recomputed from its rows)
    from residual_probe.analysis.verdicts import collapse_verdict

    for c in summary["collapse_verdicts"]:
        cos = sorted(
            (x["layer"], x["value"])
            for x in head
            if x["step"] == last - 1
            and x["metric"] == "cos_adjacent"
            and x["stack"] == c["stack"]
            and x["stream"] == c["stream"]
        )
        assert c["late_cos_adjacent"] == collapse_verdict([v for _, v in cos])["late_cos_adjacent"]
        assert (c["stack"], c["stream"]) in want
    # the verdict line says how the late cosine moved since the first recorded step
    assert "from" in summary["collapse_verdicts"][0]["since_start"] and "at step 0" in r.output
