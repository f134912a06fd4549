"""Honest files: a run that fails on bad input leaves nothing behind (no empty --out folder)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from residual_probe.cli import app

TINY = ["--depth", "2", "--d-model", "16", "--heads", "2", "--ffn", "32"]


def cases(tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    corrupt = tmp_path / "w.safetensors"
    corrupt.write_text("not weights\n" * 4)
    return {
        "train, missing data": [
            "train",
            *TINY,
            "--steps",
            "2",
            "--data",
            str(tmp_path / "nope.txt"),
        ],
        "grad-norms, binary data": ["grad-norms", *TINY, "--seeds", "1", "--data", str(binary)],
        "collapse, corrupt checkpoint": [
            "collapse",
            "--ckpt",
            str(corrupt),
            "--placement",
            "pre-ln",
            "--heads",
            "2",
        ],
        "collapse, missing checkpoint": ["collapse", "--ckpt", str(tmp_path / "absent.pt")],
    }


@pytest.mark.parametrize(
    "name",
    [
        "train, missing data",
        "grad-norms, binary data",
        "collapse, corrupt checkpoint",
        "collapse, missing checkpoint",
    ],
)
def test_a_failed_run_leaves_no_output_folder(tmp_path, name):
    args = cases(tmp_path)[name]
    out = tmp_path / "new" / "nested" / "out"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.output
    assert not (tmp_path / "new").exists()  # not the folder, nor the parents it would have made


def test_an_existing_output_folder_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, [*cases(tmp_path)["train, missing data"], "--out", str(out)])
    assert result.exit_code == 2
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "notes.txt"
    ]


def test_the_bounds_table_fits_a_terminal():
    import io

    from rich.console import Console

    from residual_probe.cli.render import checks_table

    long = (
        "Xiong T1: pre-ln last-block W2 grad ~ L^-0.5 (Theorem 1, uniform attention, d x d FFN) "
        * 2
    )
    checks = [
        {
            "statement": long,
            "setting": "fairseq/encoder",
            "placement": p,
            "predicted": "slope -0.5 (+-0.15)",
            "measured": "slope -0.410 from 2 depths (no spread: a line through two points)",
            "agreement": "yes",
        }
        for p in ("post-ln", "pre-ln", "residual")
    ]
    for width in (80, 120):
        buf = io.StringIO()
        Console(file=buf, width=width).print(checks_table(checks))
        lines = buf.getvalue().splitlines()
        assert max(len(line) for line in lines) <= width
        assert "…" not in buf.getvalue()  # nothing cut off: long cells wrap
        assert all(sum("fairseq/encoder" in line for line in lines) == 3 for _ in [0])
        assert all(any(p in line for line in lines) for p in ("post-ln", "pre-ln", "residual"))


def test_divergence_is_one_line_and_in_train_json_and_no_library_warning(tmp_path):
    import csv
    import json
    import warnings

    out = tmp_path / "div"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(
            app,
            [
                "train",
                *TINY,
                "--batch",
                "2",
                "--seq-len",
                "16",
                "--steps",
                "30",
                "--lr",
                "1e6",
                "--eval-every",
                "50",
                "--out",
                str(out),
            ],
        )
    assert result.exit_code == 0, result.output
    progress = ("train ", "memory: ", "wrote ")  # the progress bar, the estimate, the files
    lines = [line for line in result.stderr.splitlines() if not line.startswith(progress)]
    assert len(lines) == 1 and lines[0].startswith(
        "warning: training diverged: the loss became nan at step"
    ), lines
    assert "Warning" not in result.output
    assert not [w for w in caught if "matplotlib" in w.filename or "numpy" in w.filename], [
        str(w.message) for w in caught
    ]
    meta = json.loads((out / "train.json").read_text())
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert meta["diverged"]["step"] == meta["diverged_at_step"] == int(rows[-1]["step"])
    assert meta["steps_done"] == len(rows)  # what train.json says agrees with what loss.csv holds
    assert (out / "grad_heatmap.png").exists() and (
        out / "collapse.png"
    ).exists()  # the probe log's figures


def test_gradient_verdicts_quote_numbers_and_thresholds():
    import numpy as np

    from residual_probe.analysis import fits as F
    from residual_probe.analysis.verdicts import decay_verdict

    k = np.arange(12)
    # ResiDual at init in the issue: block 0 got 0.114x block 11 and was called "balanced"
    v = decay_verdict(F.geometric_decay(0.114 ** (1 - k / 11)), 12)
    assert v.startswith("gradients decay toward the input: block 0 gets 0.114x block 11's norm")
    assert "(decaying: 0.1x to 0.5x)" in v and "per block" in v
    assert decay_verdict(F.geometric_decay(1.02 ** (11 - k)), 12).startswith(
        "balanced: block 0 gets 1.24x"
    )
    assert "(balanced: 0.5x to 2x)" in decay_verdict(F.geometric_decay(1.02 ** (11 - k)), 12)
    assert decay_verdict(F.geometric_decay(1.1 ** (11 - k)), 12).startswith(
        "gradients rise toward the input"
    )
    assert "(vanishing: below 0.1x)" in decay_verdict(F.geometric_decay(0.5 ** (11 - k)), 12)


def test_collapse_verdicts_quote_numbers_and_the_worst_stream_decides():
    from residual_probe.analysis.verdicts import collapse_verdict, overall_detail, overall_verdict

    v = collapse_verdict([0.80, 0.82, 0.90, 0.92, 0.95, 0.955])
    assert v["verdict"] == "collapsing"
    assert "adjacent cos 0.9525" in v["basis"] and "collapsed if cos >= 0.98" in v["basis"]
    assert "collapsing if cos >= 0.9 and influence < 0.5x" in v["basis"]
    short = collapse_verdict([0.9, 0.93, 0.94, 0.946])  # a 4-block model: says it is few to judge
    assert "4 blocks are few to judge a trend" in short["basis"]
    streams = [
        {"stack": "decoder", "stream": "x", "verdict": "no collapse"},
        {"stack": "decoder", "stream": "d", "verdict": "collapsing"},
    ]
    assert (
        overall_verdict(streams) == "collapsing"
    )  # not "no collapse" while the dual stream collapses
    assert overall_detail(streams) == "decoder d stream; worst of 2 streams"


def test_the_sigterm_handler_is_only_installed_while_a_command_runs(tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    CliRunner().invoke(
        app, ["train", *TINY, "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]
    )
    assert (
        signal.getsignal(signal.SIGTERM) is before
    )  # a process embedding the CLI keeps its own handler


def _captured(monkeypatch):
    import residual_probe.plots.collapse as pc

    figs = []
    monkeypatch.setattr(pc, "save", lambda fig, stem, formats: figs.append(fig) or [])
    return pc, figs


def test_similarity_figure_shows_every_combination(monkeypatch):
    import numpy as np
    import pandas as pd

    pc, figs = _captured(monkeypatch)
    keys = [
        (m, s, st)
        for m in ("a", "b", "c")
        for s, st in (("encoder", "x"), ("decoder", "x"), ("decoder", "d"))
    ][:8]
    rows = [
        dict(
            model=m,
            stack=s,
            stream=st,
            metric=metric,
            layer_i=i,
            layer_j=j,
            value=float(np.cos(i - j)),
        )
        for m, s, st in keys
        for metric in ("cosine", "cka")
        for i in range(-1, 3)
        for j in range(-1, 3)
    ]
    pc.plot_similarity(pd.DataFrame(rows), "unused")
    titles = [ax.get_title() for ax in figs[0].axes if ax.get_visible() and ax.get_title()]
    assert len(titles) == 16 and all(
        any(f"{m} · {s} {st}" in t for t in titles) for m, s, st in keys
    )
    w, h = figs[0].get_size_inches() * 150
    assert w < 3000 and h < 3000  # 8 combinations, two pairs per row: 2640 x 2220 px


def test_theory_curve_only_for_the_placement_it_belongs_to(monkeypatch):
    import numpy as np

    pc, figs = _captured(monkeypatch)
    rows = [
        dict(model="m", stack="encoder", layer=k, stream="x", metric=metric, value=v)
        for k in range(4)
        for metric, v in (("cos_adjacent", 0.9), ("block_influence", 0.1))
    ]
    k = np.arange(4)
    theory = {
        "cos_adjacent": np.sqrt((k + 1) / (k + 2)),
        "block_influence": 1 - np.sqrt((k + 1) / (k + 2)),
    }
    for placement, drawn in (("post-ln", False), ("pre-ln", True)):
        pc.plot_collapse_curves(rows, {"m": placement}, theory, "unused")
        labels = [t.get_text() for legend in figs[-1].legends for t in legend.get_texts()]
        assert any("Pre-LN theory" in t and "Xie et al. 2023" in t for t in labels) is drawn, (
            placement,
            labels,
        )
        assert not any(
            ax.get_legend() for ax in figs[-1].axes
        )  # legends below the panels, not over data


def test_theorem1_slope_from_two_depths_says_so():
    import numpy as np

    from residual_probe.analysis.checks import theorem1

    w2 = np.array([[1.0, 0.7], [1.1, 0.76]])  # (seeds, depths)
    check, _ = theorem1("xiong/encoder", "pre-ln", [6, 12], w2)
    row = check.to_row()
    assert "from only 2 depths (no uncertainty" in row["measured"] and "nan" not in row["measured"]
    assert row["agreement"].endswith("(from 2 depths only)")
    three, _ = theorem1(
        "xiong/encoder", "pre-ln", [6, 12, 24], np.array([[1.0, 0.7, 0.5], [1.1, 0.76, 0.52]])
    )
    assert (
        "from 3 depths" in three.to_row()["measured"] and "only" not in three.to_row()["agreement"]
    )


def test_one_vanishing_threshold_and_one_stream_name():
    """The studies, diagnosis and the decay sentence use the one vanishing threshold; streams are
    named one way on the console, in the report and in collapse.json."""
    import numpy as np

    from residual_probe.analysis.diagnosis import gradient_verdict
    from residual_probe.analysis.verdicts import VANISHING_RATIO, is_vanishing, stream_name

    k = np.arange(12)
    just_below = VANISHING_RATIO * 0.99 ** (1 / 11)
    norms = just_below ** (1 - k / 11)  # block 0 / block 11 = just_below
    v = gradient_verdict(norms)
    assert v["vanishing"] is True and is_vanishing(v["first_over_last"])
    assert v["verdict"].startswith("gradients vanish")
    assert gradient_verdict(np.ones(12))["vanishing"] is False
    assert not is_vanishing(VANISHING_RATIO) and not is_vanishing(float("nan"))
    assert stream_name("decoder", "x") == "decoder" and stream_name("decoder", "-") == "decoder"
    assert stream_name("decoder", "d") == "decoder d stream"
    assert stream_name("encoder", "x", always=True) == "encoder x stream"
