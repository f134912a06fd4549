"""The collapse job end to end on tiny saved models, its verdict, and the CLI's handling of bad files."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from residual_probe.analysis.verdicts import collapse_verdict
from residual_probe.checkpoints import load_any, save_model
from residual_probe.checkpoints.text import read_text
from residual_probe.cli import app
from residual_probe.jobs.collapse import CollapseSpec, make_batches, run_collapse
from residual_probe.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    for placement in ("pre-ln", "residual"):
        torch.manual_seed(0)
        cfg = ModelConfig(
            arch="decoder", placement=placement, depth=4, d_model=32, heads=4, ffn=64, max_len=64
        )
        save_model(build_model(cfg), root / placement)
    return root


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def naive_cos(model, batches):
    """Token-pooled mean cos(h_{k-1}, h_k) per block, from a plain loop over the blocks."""
    stack = model.decoder
    sums, n = torch.zeros(len(stack.layers), dtype=torch.float64), 0
    with torch.no_grad():
        for ids in batches:
            x = stack.placement.begin(stack.embed(ids), stack)
            for k, blk in enumerate(stack.layers):
                y = blk(x)
                sums[k] += torch.nn.functional.cosine_similarity(
                    x.double(), y.double(), dim=-1
                ).sum()
                x = y
            n += ids.numel()
    return (sums / n).tolist()


def test_collapse_outputs_match_a_naive_loop(saved, tmp_path):
    spec = CollapseSpec(
        ckpts=(str(saved / "pre-ln"), str(saved / "residual")),
        tokens=600,
        batch=3,
        seq_len=40,
        subsample=64,
    )
    meta = run_collapse(spec, tmp_path / "out")
    for name in (
        "collapse.csv",
        "similarity.csv",
        "collapse.json",
        "collapse_curves.png",
        "similarity.png",
        "norm_growth.png",
    ):
        assert (tmp_path / "out" / name).is_file()
    rows = read_csv(tmp_path / "out" / "collapse.csv")
    assert set(rows[0]) == {"model", "stack", "layer", "stream", "metric", "value"}
    metrics = {r["metric"] for r in rows}
    assert {
        "cos_adjacent",
        "block_influence",
        "relative_update",
        "norm_sq_per_dim",
        "ln_update",
        "effective_rank",
    } <= metrics
    # 600 tokens in windows of 40 -> 15 windows; the pooled cosine equals a plain loop's.
    loaded = load_any(saved / "pre-ln")
    batches, data = make_batches(loaded, spec, read_text(None)[0])
    assert data["tokens"] == 600 and len(batches) == 5
    expected = naive_cos(loaded.model, batches)
    got = [
        float(r["value"]) for r in rows if r["model"] == "pre-ln" and r["metric"] == "cos_adjacent"
    ]
    assert got == pytest.approx(expected, abs=1e-5)
    # Similarity: unit diagonal, symmetric, layers -1..3 for each stream (ResiDual has x and d).
    sim = read_csv(tmp_path / "out" / "similarity.csv")
    keys = {(r["model"], r["stream"]) for r in sim}
    assert keys == {("pre-ln", "x"), ("residual", "x"), ("residual", "d")}
    cos = {
        (int(r["layer_i"]), int(r["layer_j"])): float(r["value"])
        for r in sim
        if r["model"] == "pre-ln" and r["metric"] == "cosine"
    }
    assert len(cos) == 25 and all(abs(cos[(i, i)] - 1) < 1e-5 for i in range(-1, 4))
    assert all(abs(cos[(i, j)] - cos[(j, i)]) < 1e-6 for i in range(-1, 4) for j in range(-1, 4))
    summary = json.loads((tmp_path / "out" / "collapse.json").read_text())
    first, second = summary["models"]
    assert first["placement"] == "pre-ln" and second["placement"] == "residual"
    assert first["depth"] == {"decoder": 4} and first["width"] == 32
    assert first["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert [r["layer"] for r in first["streams"][0]["redundant"]] == sorted(
        range(4), key=lambda k: -got[k]
    )[:3]
    assert meta["models"][0]["verdict"] in ("collapsed", "collapsing", "no collapse")


def test_verdict_thresholds():
    pre_ln_theory = [math.sqrt(k / (k + 1)) for k in range(1, 61)]
    assert collapse_verdict(pre_ln_theory)["verdict"] == "collapsed"  # late blocks: cos > 0.99
    assert collapse_verdict([0.80, 0.82, 0.90, 0.92, 0.95, 0.955])["verdict"] == "collapsing"
    assert collapse_verdict([0.7, 0.72, 0.69, 0.71, 0.7, 0.7])["verdict"] == "no collapse"
    assert collapse_verdict([float("nan")] * 3)["verdict"].startswith("unknown")


def test_cli_prints_summary_and_rejects_bad_files(saved, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "collapse",
            "--ckpt",
            str(saved / "residual"),
            "--tokens",
            "256",
            "--seq-len",
            "32",
            "--subsample",
            "32",
            "--out",
            str(tmp_path / "ok"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "placement: residual" in res.output and "most redundant blocks" in res.output
    # the massive-activation finding is a result: on stdout, one line per stream (ResiDual: x and d)
    massive = [s.strip() for s in res.stdout.splitlines() if "massive activations" in s]
    assert sorted(s.split(":")[0] for s in massive) == ["decoder", "decoder d stream"], res.stdout
    for data in (b"", b"\x80\x02garbage", b"PK\x03\x04broken zip"):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(data)
        res = runner.invoke(app, ["collapse", "--ckpt", str(bad), "--out", str(tmp_path / "bad")])
        assert res.exit_code == 2
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
        assert not (tmp_path / "bad" / "collapse.csv").exists()


def test_labels_tell_models_apart_by_the_shortest_path_suffix(tmp_path):
    from residual_probe.checkpoints.registry import labels_for

    a, b = tmp_path / "runs" / "pre-ln" / "model", tmp_path / "runs" / "post-ln" / "model"
    assert labels_for((str(a), str(b))) == ["pre-ln/model", "post-ln/model"]
    assert labels_for((str(a), str(tmp_path / "x.pt"))) == ["model", "x.pt"]
    assert labels_for((str(a), str(a))) == ["model#0", "model#1"]


def test_massive_activations_are_named_with_their_numbers():
    """A few tokens made huge at block 2's output: the mean jumps, the median does not, and the
    verdict names the blocks, how many tokens and how large (Sun et al. 2024's massive activations)."""
    from residual_probe.analysis.collapse import massive_activations, massive_sentence
    from residual_probe.checkpoints.loaded import ours
    from residual_probe.jobs.collapse import CollapseSpec, measure_forward
    from residual_probe.models import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            arch="decoder", placement="pre-ln", depth=4, d_model=16, heads=2, ffn=32, max_len=64
        )
    ).eval()

    def spike(module, args, out):  # token 0 of every sequence x 100 in the residual stream
        out = out.clone()
        out[:, 0] *= 100.0
        return out

    model.decoder.layers[2].register_forward_hook(spike)
    batches = [torch.randint(3, 250, (4, 16)) for _ in range(2)]
    m = measure_forward(
        ours(model, "residual-probe", "test"), batches, CollapseSpec(ckpts=("x",), subsample=16)
    )
    by = {(r["metric"], r["layer"]): r["value"] for r in m["rows"] if r["stream"] == "x"}
    assert (
        by[("massive_count", 2)] == 8 and by[("tokens", 2)] == 128
    )  # 8 sequences, token 0 of each
    assert by[("massive_count", 1)] == 0
    assert (
        by[("norm_sq_per_dim", 2)] > 50 * by[("norm_sq_per_dim_median", 2)]
    )  # the mean is pulled up
    (f,) = [f for f in massive_activations(m["rows"]) if f["stack"] == "decoder"]
    # Pre-LN: the residual carries block 2's spike through block 3, 2 of 4 blocks: persistent
    line = massive_sentence(f)
    assert "at blocks 2-3 (2 of 4 blocks): 8 of 128 tokens" in line and "median" in line
    assert (
        by[("norm_sq_per_dim_max", 2)] > 1000 * by[("norm_sq_per_dim_median", 2)]
    )  # 100x the state: 10^4 in h^2


def smollm2_like_stream(bump=True, persistent=True):
    """A synthetic 30-block stream of 2048 tokens with SmolLM2-135M's shape (issue 35): median
    ||h||^2/d ~33; a transient bump at blocks 2-4 (9 tokens at 144x), gone by block 5; massive
    activations from block 11 through 28 (8 tokens, peaking at 1.2e6 at block 20); block 29 none."""
    import numpy as np

    rng = np.random.default_rng(0)
    per_token = {}
    for k in range(30):
        v = rng.lognormal(np.log(33.0), 0.3, 2048)
        if bump and 2 <= k <= 4:
            v[100:109] = 144 * np.median(v)
        if persistent and 11 <= k <= 28:
            v[:8] = 1.2e6 * (1.0 if k == 20 else 0.8)
        per_token[("decoder", k, "x")] = v
    return per_token


def test_massive_activations_are_where_they_persist_not_where_a_bump_is():
    """The finding names the block range where massive tokens appear and stay (11-28), their peak,
    its ratio to the median and the token count; the earlier transient bump is named apart."""
    from residual_probe.analysis.collapse import (
        massive_activations,
        massive_sentence,
        token_norm_rows,
    )

    (f,) = massive_activations(token_norm_rows(smollm2_like_stream()))
    (run,) = f["persistent"]
    assert (run["first"], run["last"], run["peak_block"]) == (11, 28, 20)
    assert run["peak"] == pytest.approx(1.2e6) and run["count_min"] == run["count_max"] == 8
    assert run["median"] == pytest.approx(33, rel=0.05) and run["ratio"] == pytest.approx(
        1.2e6 / run["median"]
    )
    (bump,) = f["transient"]
    assert (bump["first"], bump["last"], bump["count_max"]) == (2, 4, 9)
    line = massive_sentence(f)
    assert line.startswith(
        "decoder: massive activations at blocks 11-28 (18 of 30 blocks): 8 of 2048"
    )
    assert "1.2e+06 at block 20" in line and "transient: blocks 2-4 (9 of 2048 tokens" in line
    # a transient bump alone is not called massive activations; a quiet stream says so
    (f,) = massive_activations(token_norm_rows(smollm2_like_stream(persistent=False)))
    assert not f["persistent"] and massive_sentence(f).startswith(
        "decoder: no persistent massive activations"
    )
    (f,) = massive_activations(token_norm_rows(smollm2_like_stream(False, False)))
    assert massive_sentence(f).startswith("decoder: no massive activations")
