"""diagnose: one self-contained HTML page (parsed here) and a Markdown twin, verdicts first."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
import torch
from typer.testing import CliRunner

from residual_probe.checkpoints import save_model
from residual_probe.checkpoints.safetensors_io import load_file, save_file
from residual_probe.cli import app
from residual_probe.models import ModelConfig, build_model

runner = CliRunner()


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts, self.items, self.headings, self.cells = (
            [],
            [],
            0,
            [],
            [],
            [],
        )
        self._tag = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._tag = tag
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("link", "iframe", "object", "embed") or (tag == "a" and "href" in a):
            self.links.append(a)
        if tag == "script":
            self.scripts += 1
        if tag == "style" and a:
            self.links.append(a)

    def handle_endtag(self, tag):
        self._tag = None

    def handle_data(self, data):
        if not data.strip():
            return
        if self._tag == "li":
            self.items.append(data)
        elif self._tag in ("h1", "h2", "h3"):
            self.headings.append(data)
        elif self._tag == "td":
            self.cells.append(data)


def models(tmp_path):
    paths = []
    for placement in ("post-ln", "pre-ln"):
        torch.manual_seed(0)
        model = build_model(
            ModelConfig(
                arch="decoder",
                placement=placement,
                depth=4,
                d_model=16,
                heads=2,
                ffn=24,
                max_len=64,
            )
        )
        paths.append(save_model(model, tmp_path / placement))
    return paths


def parse(path):
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_report_is_self_contained_with_verdicts_first(tmp_path, monkeypatch):
    import residual_probe.checkpoints as checkpoints

    post, pre = models(tmp_path)
    out = tmp_path / "d"
    loads, load_any = [], checkpoints.load_any

    def counted(path, *args, **kwargs):
        loads.append(str(path))
        return load_any(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "load_any", counted)
    res = runner.invoke(
        app,
        [
            "diagnose",
            "--ckpt",
            str(post),
            "--compare",
            str(pre),
            "--tokens",
            "128",
            "--seq-len",
            "32",
            "--subsample",
            "32",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert loads == [
        str(post),
        str(pre),
    ]  # each checkpoint loaded once, for both parts (jobs.inspection)
    page = parse(out / "report.html")
    assert page.headings[1] == "Verdicts"  # right after the title
    assert len(page.images) == 4 and all(
        src.startswith("data:image/png;base64,") for src in page.images
    )
    assert page.links == [] and page.scripts == 0
    text = (out / "report.html").read_text()
    assert "http://" not in text and "https://" not in text
    grads = json.loads((out / "gradients" / "grad_norms.json").read_text())
    coll = json.loads((out / "collapse" / "collapse.json").read_text())
    for m in grads["models"]:  # every gradient verdict is on the page, with its numbers
        for v in m["verdicts"]:
            assert f"{v['stack']}: {v['verdict']}" in page.items
            assert (
                f"{v['first_over_last']:.2g}" in v["verdict"]
                or f"{v['first_over_last']:.3g}" in v["verdict"]
            )
    for m in coll["models"]:
        for s in m["streams"]:
            assert any(
                i.startswith(f"{s['stack']}: ") and f"{s['late_cos_adjacent']:.3f}" in i
                for i in page.items
            )
    # The model description: detected placement, norm type, depth, width, parameters.
    for expected in ("post-ln", "pre-ln", "layernorm", "decoder 4", "16", "causal-lm"):
        assert expected in page.cells
    md = (out / "report.md").read_text()
    assert md.index("## Verdicts") < md.index("## Models") < md.index("## Figures")
    # max attention logit and mean entropy per block on the text, as collapse.csv holds them
    import pandas as pd

    table = pd.read_csv(out / "collapse" / "collapse.csv")
    for metric, caption in (
        ("attn_logit_max", "### Largest attention logit per block"),
        ("attn_entropy", "### Mean attention entropy per block"),
    ):
        assert caption in md
        section = md.split(caption)[1].split("###")[0]
        v = table[(table["metric"] == metric) & (table["layer"] == 3)]["value"].tolist()
        assert len(v) == 2 and all(f"| {x:.4g} |" in section for x in v)  # both models, block 3
    assert "](gradients/grad_norms.png)" in md and "```\nresidual-probe diagnose" in md
    # the times agree: the three parts add up to the whole, and so do each model's own
    times = dict(re.findall(r"^- (.+): ([\d.]+) s$", md.split("## Run")[1], re.M))
    times = {k: float(v) for k, v in times.items()}
    parts = (
        "loading and placement detection",
        "gradients (one gradient per model)",
        "collapse (forward statistics)",
    )
    assert sum(times[p] for p in parts) == pytest.approx(
        times["all models, the three parts"], abs=0.25
    )
    for part, name in zip(("load", "gradients", "collapse"), parts):
        assert sum(times[f"{m['label']}: {part}"] for m in grads["models"]) == pytest.approx(
            times[name], abs=0.15
        )


def test_partly_random_model_is_said_first(tmp_path):
    post, _ = models(tmp_path)
    tensors, meta = load_file(post / "model.safetensors")
    del tensors["decoder.layers.3.ffn.norm.weight"]
    save_file(tensors, post / "model.safetensors", meta)
    args = [
        "diagnose",
        "--ckpt",
        str(post),
        "--tokens",
        "64",
        "--seq-len",
        "32",
        "--subsample",
        "16",
        "--out",
        str(tmp_path / "d"),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "decoder.layers.3.ffn.norm.weight" in res.output
    assert not (tmp_path / "d" / "report.html").exists()
    res = runner.invoke(app, args + ["--allow-missing-weights"])
    assert res.exit_code == 0, res.output
    page = parse(tmp_path / "d" / "report.html")
    assert page.items[0].startswith("partly random model: 1 weights")
    assert "decoder.layers.3.ffn.norm.weight" in page.items[0]


@pytest.mark.parametrize(
    "bad,message",
    [(["--loss", "xyz"], "--loss: unknown 'xyz'"), (["--seq-len", "1"], "seq-len: must be >= 2")],
)
def test_bad_flags(tmp_path, bad, message):
    post, _ = models(tmp_path)
    res = runner.invoke(app, ["diagnose", "--ckpt", str(post), *bad, "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and message in res.output


def test_the_console_says_what_the_verdict_rests_on(tmp_path):
    """A short text, a worse-than-uniform loss: both on the console and at the top of the report."""
    ckpt = models(tmp_path)[0]
    text = tmp_path / "short.txt"
    text.write_text("a short text. " * 50)  # 700 bytes: far fewer tokens than asked
    r = runner.invoke(
        app,
        [
            "diagnose",
            "--ckpt",
            str(ckpt),
            "--data",
            str(text),
            "--tokens",
            "100000",
            "--seq-len",
            "32",
            "--batch",
            "8",
            "--out",
            str(tmp_path / "d"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "data: 21 windows x 32 tokens = 672 tokens" in r.stdout
    assert "the text gives only 700 tokens" in r.stderr  # the adjustment, a note on the console
    # a random model does not predict text: its mean loss is above ln(256), a warning
    assert "warning: post-ln: the model does not predict this text" in r.stderr
    md = (tmp_path / "d" / "report.md").read_text()
    verdicts = md.split("## Verdicts")[1].split("## Models")[0]
    assert verdicts.index("warning: the model does not predict") < verdicts.index("decoder:")
    assert "data: 21 windows x 32 tokens" in verdicts
    # the report's command line is what was typed, a typed default (--batch 8) included
    assert "--tokens 100000" in md and "--seq-len 32" in md and "--batch 8" in md


def test_loss_warning_rule():
    import math

    from residual_probe.analysis.diagnosis import loss_warnings

    assert loss_warnings(6.0, 1000, "hf") == []  # below ln(1000) = 6.91
    (w,) = loss_warnings(8.27, 1000, "fairseq")
    assert "ln(1000) = 6.91" in w and "--dict" in w
    assert "--dict" not in loss_warnings(8.27, 1000, "hf")[0]
    assert loss_warnings(math.nan, 1000, "hf")[0].startswith("the mean loss is nan")


def test_a_causal_lm_is_diagnosed_in_one_pass_with_the_numbers_of_collapse(tmp_path, monkeypatch):
    """The gradient's forward pass also records the forward statistics (no second forward), and
    they equal what `collapse` measures in a pass of its own on the same windows."""
    import pandas as pd

    import residual_probe.jobs.collapse as collapse_job

    post, _ = models(tmp_path)
    args = ["--ckpt", str(post), "--tokens", "128", "--seq-len", "32", "--subsample", "32"]
    alone = runner.invoke(app, ["collapse", *args, "--out", str(tmp_path / "c")])
    assert alone.exit_code == 0, alone.output

    def no_second_pass(*a, **k):
        raise AssertionError("diagnose ran a second forward pass for collapse")

    monkeypatch.setattr(collapse_job, "measure_forward", no_second_pass)
    res = runner.invoke(app, ["diagnose", *args, "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    keys = ["model", "stack", "layer", "stream", "metric"]
    a = pd.read_csv(tmp_path / "c" / "collapse.csv").sort_values(keys).reset_index(drop=True)
    b = pd.read_csv(tmp_path / "d" / "collapse" / "collapse.csv")
    b = b.sort_values(keys).reset_index(drop=True)
    assert a[keys].equals(b[keys]) and len(a) > 40
    assert a["value"].to_numpy() == pytest.approx(b["value"].to_numpy(), rel=1e-5, abs=1e-7)
    sim_a = pd.read_csv(tmp_path / "c" / "similarity.csv")["value"].to_numpy()
    sim_b = pd.read_csv(tmp_path / "d" / "collapse" / "similarity.csv")["value"].to_numpy()
    assert sim_a == pytest.approx(sim_b, rel=1e-5, abs=1e-6)
    times = json.loads((tmp_path / "d" / "collapse" / "collapse.json").read_text())
    assert times["models"][0]["times"]["same_pass_as_gradient"] is True
