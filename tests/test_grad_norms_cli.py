"""`residual-probe grad-norms` end to end: its CSV against a plain autograd pass, and bad input."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from residual_probe.cli import app
from residual_probe.data import BatchSource
from residual_probe.models import PLACEMENTS, ModelConfig, Transformer

TINY = "--depth 3 --d-model 16 --heads 2 --ffn 32 --batch 2 --seq-len 6".split()
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["grad-norms", *TINY, *args])


def read_rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def direct_block_norms(placement, arch, seed, steps=0, lr=5e-4):
    """Per-block gradient norms from a plain autograd pass (naive loop over .grad), every step."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch=arch, placement=placement, depth=3, d_model=16, heads=2, ffn=32, max_len=1024
    )
    model = Transformer(cfg)
    source = BatchSource(arch, 2, 6, cfg.vocab_size, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-8)
    out = {}
    for step in range(steps + 1):
        batch = source.next()
        opt.zero_grad()
        logits = model(*batch.inputs)
        torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100
        ).backward()
        for role, stack in model.stacks():
            for k, blk in enumerate(stack.layers):
                sq = sum(
                    float((p.grad.double() ** 2).sum())
                    for p in blk.parameters()
                    if p.grad is not None
                )
                out[(step, role, k)] = math.sqrt(sq)
                sq = sum(float((p.grad.double() ** 2).sum()) for p in blk.ffn.parameters())
                out[(step, role, k, "ffn")] = math.sqrt(sq)
        if step < steps:
            opt.step()
    return out


@pytest.mark.parametrize("arch", ["seq2seq", "decoder", "encoder"])
def test_csv_equals_direct_autograd_for_every_placement(tmp_path, arch):
    placements = sorted(PLACEMENTS)
    result = invoke(
        "--arch", arch, "--seeds", "2", "--placements", ",".join(placements), "--out", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "grad_norms.csv")
    assert list(rows[0]) == [
        "placement",
        "seed",
        "step",
        "stack",
        "layer",
        "sublayer",
        "param_grad_norm",
    ]
    # rows per (placement, seed): 3 blocks x (block, self_attn, [cross_attn,] ffn) per stack
    per_run = {"seq2seq": 3 * 3 + 3 * 4, "decoder": 3 * 3, "encoder": 3 * 3}[arch]
    blocks = [r for r in rows if r["stack"] != "model"]
    assert len(blocks) == len(placements) * 2 * per_run
    # and the whole-model rows: the parts outside the blocks and the total, one "total" per run
    totals = [r for r in rows if r["stack"] == "model" and r["sublayer"] == "total"]
    assert len(totals) == len(placements) * 2 and {
        r["sublayer"] for r in rows if r["stack"] == "model"
    } >= {"embedding", "total"}
    for placement in placements:
        for seed in (0, 1):
            direct = direct_block_norms(placement, arch, seed)
            mine = [r for r in rows if r["placement"] == placement and int(r["seed"]) == seed]
            for r in mine:
                key = (0, r["stack"], int(r["layer"]))
                if r["sublayer"] == "block":
                    assert float(r["param_grad_norm"]) == pytest.approx(direct[key], rel=1e-5), (
                        placement,
                        r,
                    )
                elif r["sublayer"] == "ffn":
                    assert float(r["param_grad_norm"]) == pytest.approx(
                        direct[key + ("ffn",)], rel=1e-5
                    )
    assert (tmp_path / "grad_norms.png").stat().st_size > 10_000
    assert (tmp_path / "grad_norms.json").exists()


def test_steps_record_every_step_and_match_direct_adam(tmp_path):
    result = invoke(
        "--arch",
        "decoder",
        "--seeds",
        "1",
        "--placements",
        "post-ln,residual",
        "--steps",
        "3",
        "--lr",
        "1e-3",
        "--out",
        str(tmp_path),
        "--format",
        "png,svg",
    )
    assert result.exit_code == 0, result.output
    rows = [r for r in read_rows(tmp_path / "grad_norms.csv") if r["sublayer"] == "block"]
    assert sorted({int(r["step"]) for r in rows}) == [0, 1, 2, 3]
    for placement in ("post-ln", "residual"):
        direct = direct_block_norms(placement, "decoder", 0, steps=3, lr=1e-3)
        for r in rows:
            if r["placement"] == placement:
                key = (int(r["step"]), r["stack"], int(r["layer"]))
                assert float(r["param_grad_norm"]) == pytest.approx(direct[key], rel=1e-4)
    assert (tmp_path / "grad_norms.svg").exists()


def test_data_file_is_used(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("The residual stream carries every layer's update. " * 40, encoding="utf-8")
    result = invoke(
        "--arch",
        "decoder",
        "--seeds",
        "1",
        "--placements",
        "pre-ln",
        "--data",
        str(text),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 0, result.output
    assert (
        len([r for r in read_rows(tmp_path / "o" / "grad_norms.csv") if r["stack"] != "model"])
        == 3 * 3
    )


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "residual_probe.cli", "grad-norms", *TINY, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def bad_input_cases(tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    return {
        "unknown placement": (
            ["--placements", "post-ln,pre_ln"],
            "placement: unknown 'pre_ln'; choose one of post-ln, pre-ln, residual",
        ),
        "depth < 1": (["--depth", "0"], "depth: must be a positive integer"),
        "heads": (
            ["--d-model", "10", "--heads", "3"],
            "d_model (10) must be divisible by heads (3)",
        ),
        "missing data": (["--data", str(tmp_path / "nope.txt")], "cannot read data file"),
        "data is a folder": (["--data", str(tmp_path)], "cannot read data file"),
        "binary data": (["--data", str(binary)], "is not UTF-8 text"),
        "unwritable out": (["--out", str(blocker / "sub")], "cannot write to output folder"),
        "bad format": (["--format", "png,jpg"], "--format: unknown jpg"),
        "bad arch": (["--arch", "gpt"], "arch: unknown 'gpt'"),
    }


def test_bad_input_gives_one_line_and_no_files(tmp_path):
    """In process (the CLI's error mapping), and the first case once more in a real process (its exit status)."""
    for i, (name, (args, message)) in enumerate(bad_input_cases(tmp_path).items()):
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        extra = [] if "--out" in args else ["--out", str(out)]
        if i == 0:
            proc = run_cli(*args, *extra, cwd=tmp_path)
            code, stderr, stdout = proc.returncode, proc.stderr, proc.stdout
        else:
            r = invoke(*args, *extra)
            code, stderr, stdout = r.exit_code, r.stderr, r.stdout
        assert code == 2, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            name,
            stderr,
        )
        assert "Traceback" not in stderr + stdout
        assert not list(out.glob("grad_norms*")), name


def test_theory_overlay_prints_a_verdict_per_placement_and_stack(tmp_path):
    import json

    result = invoke(
        "--seeds",
        "2",
        "--placements",
        "post-ln,residual,rezero",
        "--theory",
        "--out",
        str(tmp_path),
    )
    assert result.exit_code == 0, result.output
    verdicts = json.loads((tmp_path / "grad_norms.json").read_text())["verdicts"]
    assert {(v["placement"], v["stack"]) for v in verdicts} == {
        (p, s) for p in ("post-ln", "residual", "rezero") for s in ("encoder", "decoder")
    }
    # ReZero's encoder gets no gradient at init (every gate is 0): reported, not fitted, no crash.
    rezero_enc = next(v for v in verdicts if v["placement"] == "rezero" and v["stack"] == "encoder")
    assert rezero_enc["verdict"].startswith("not fitted")
    post_dec = next(v for v in verdicts if v["placement"] == "post-ln" and v["stack"] == "decoder")
    assert post_dec["verdict"] in result.output and 0 < post_dec["rate"] < 1


def test_flags_of_the_other_mode_are_refused(tmp_path):
    """--ckpt with a reference-model flag, or a checkpoint flag without --ckpt: one line, exit 2."""
    r = runner.invoke(
        app,
        [
            "grad-norms",
            "--ckpt",
            str(tmp_path / "x"),
            "--depth",
            "12",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert (
        r.exit_code == 2
        and "--depth sets up the reference models and does not apply with --ckpt" in r.output
    )
    r = runner.invoke(app, ["grad-norms", "--tokens", "100", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--tokens needs --ckpt" in r.output
    assert not (tmp_path / "o").exists()


def test_all_placements_keyword_and_small_multiples(tmp_path, monkeypatch):
    """ALL is every registered placement, in registry order; more than six are drawn one panel each."""
    import pandas as pd

    from residual_probe.models import PLACEMENTS
    from residual_probe.models.placements import expand_placements
    from residual_probe.plots import grad_norms

    assert expand_placements(["pre-ln", "all"]) == ("pre-ln",) + tuple(
        p for p in PLACEMENTS if p != "pre-ln"
    )
    band = pd.DataFrame(
        [
            dict(placement=p, stack=s, layer=k, center=1.0 + k, low=1.0, high=2.0 + k, seeds=2)
            for p in PLACEMENTS
            for s in ("encoder", "decoder")
            for k in range(4)
        ]
    )
    figures = []
    monkeypatch.setattr(grad_norms, "save", lambda fig, stem, formats: figures.append(fig) or [])
    grad_norms.plot_grad_norms(band, tmp_path / "g", steps=3)
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [grad_norms.label(p) for p in PLACEMENTS]
    assert all(len(ax.lines) >= 2 for ax in panels)  # its two stacks, at least
