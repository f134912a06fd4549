"""Memory budgets (residual_probe.budget): exact parameter counts, estimates near measured peaks,
and impossible sizes refused in one line before anything is built or written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from residual_probe import budget
from residual_probe.cli import app
from residual_probe.jobs.grad_norms import GradNormsSpec
from residual_probe.models import ModelConfig, Transformer
from residual_probe.models.placements import PLACEMENTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", ["decoder", "encoder", "seq2seq"])
def test_parameter_count_is_exact_for_every_placement(arch):
    for placement in PLACEMENTS:
        # a placement with a norm of its own (DyT) takes no `norm`
        norm = {} if PLACEMENTS[placement].norm else {"norm": "rmsnorm"}
        for extra in ({}, {**norm, "tie_embeddings": False}):
            if arch == "seq2seq":
                extra = {
                    **extra,
                    "decoder_depth": 4,
                    "share_all_embeddings": "tie_embeddings" not in extra,
                }
            cfg = ModelConfig(
                arch=arch, placement=placement, depth=3, d_model=16, heads=2, ffn=24, **extra
            )
            model = Transformer(cfg)
            real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
            assert budget.model_parameters(cfg)[0] == real, (placement, extra)


MEASURE = textwrap.dedent("""
    import ctypes, gc, json, sys
    import torch
    torch.set_num_threads(1)
    from residual_probe.jobs.grad_norms import GradNormsSpec, record_run

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    cases = [GradNormsSpec(seeds=1, **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})
             for kw in json.loads(sys.argv[1])]
    # kernels and allocator warmed on tiny models first, so their one-time cost is not counted
    for spec in cases:
        record_run(GradNormsSpec(placements=spec.placements, seeds=1, steps=1, arch=spec.arch, depth=1, d_model=8,
                                 heads=2, ffn=8, batch=1, seq_len=4), spec.placements[0], 0)
    peaks = []
    for spec in cases:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the memory an earlier case freed goes back to the system
        base = status("VmRSS")
        # Peak RSS from here: reset the high-water mark (ru_maxrss would carry the forking parent's
        # peak across exec, which inside a large pytest process dominates).
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        record_run(spec, spec.placements[0], 0)
        peaks.append(status("VmHWM") - base)
    print(json.dumps(peaks))
""")
FACTOR = 1.5  # measured 0.88x-1.19x on six configs (budget.py's docstring)
PEAK_CASES = {  # the largest first
    "encoder-post-ln-adam": dict(
        arch="encoder",
        placements=("post-ln",),
        depth=8,
        d_model=512,
        heads=8,
        ffn=512,
        batch=4,
        seq_len=64,
        steps=2,
    ),
    "seq2seq-residual": dict(
        arch="seq2seq",
        placements=("residual",),
        depth=3,
        d_model=128,
        heads=4,
        ffn=512,
        batch=8,
        seq_len=256,
    ),
    "decoder-pre-ln-adam": dict(
        arch="decoder",
        placements=("pre-ln",),
        depth=4,
        d_model=256,
        heads=4,
        ffn=1024,
        batch=8,
        seq_len=128,
        steps=1,
    ),
}


@pytest.fixture(scope="module")
def measured_peaks():
    """Peak RSS above the warmed-up baseline of each case (130-240 MiB here), the cases one after
    the other in one fresh process (torch imported once). Each case's peak is within 6 % of what
    it shows alone in its own process (measured: 236/171/138 MiB against 235/162/130 MiB)."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    arg = json.dumps(
        [
            {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
            for kw in PEAK_CASES.values()
        ]
    )
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, arg], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return dict(zip(PEAK_CASES, json.loads(proc.stdout.strip().splitlines()[-1])))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc")
@pytest.mark.parametrize("case", list(PEAK_CASES))
def test_estimate_is_within_a_factor_of_the_measured_peak(case, measured_peaks):
    measured = measured_peaks[case]
    est = budget.grad_norms_estimate(GradNormsSpec(seeds=1, **PEAK_CASES[case])).peak_bytes
    assert 1 / FACTOR < est / measured < FACTOR, (
        f"estimate {est / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    )


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    "args, what",
    [
        (["train", "--d-model", "1000000"], "train (decoder residual, 24 blocks, d 1000000"),
        (["train", "--depth", "20000", "--steps", "10"], "train (decoder residual, 20000 blocks"),
        (["grad-norms", "--depth", "5000"], "grad-norms (seq2seq residual, 10000 blocks"),
        (["bounds", "--depth", "100000"], "bounds (depth 100000"),
    ],
)
def test_impossible_sizes_are_refused_before_anything_is_built(tmp_path, args, what):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert (
        what in line
        and "needs about" in line
        and "parameters" in line
        and "this machine has" in line
    )
    assert "--force" in line
    assert not out.exists()  # refused before the output folder was made


def test_memory_env_and_force(tmp_path, monkeypatch):
    tiny = "grad-norms --depth 2 --d-model 16 --heads 2 --ffn 32 --seeds 1".split()
    tiny += "--batch 2 --seq-len 8 --placements pre-ln".split()
    monkeypatch.setenv(budget.MEMORY_ENV, "64KiB")
    refused = CliRunner().invoke(app, [*tiny, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2
    assert "this machine has 64.0 KiB RESIDUAL_PROBE_MEMORY" in one_error_line(refused)
    forced = CliRunner().invoke(app, [*tiny, "--out", str(tmp_path / "b"), "--force"])
    assert forced.exit_code == 0, forced.output
    assert "warning: --force" in forced.stderr and (tmp_path / "b" / "grad_norms.csv").exists()
    monkeypatch.setenv(budget.MEMORY_ENV, "8GiB")
    ok = CliRunner().invoke(app, [*tiny, "--out", str(tmp_path / "c")])
    assert (
        ok.exit_code == 0
        and "memory: about" in ok.stderr
        and "8.0 GiB RESIDUAL_PROBE_MEMORY" in ok.stderr
    )
    monkeypatch.setenv(budget.MEMORY_ENV, "lots")
    bad = CliRunner().invoke(app, [*tiny, "--out", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "RESIDUAL_PROBE_MEMORY: expected a size" in one_error_line(bad)


def test_parse_size_and_human():
    assert budget.parse_size("8GiB") == 8 * 2**30
    assert budget.parse_size("512 MB") == 512 * 10**6
    assert budget.parse_size("1e9") == 10**9
    for bad in ("", "-1G", "12 parsecs", "0"):
        with pytest.raises(budget.BudgetError):
            budget.parse_size(bad)
    assert budget.human(1536) == "1.5 KiB" and budget.human(3 * 2**40) == "3.0 TiB"


def test_available_memory_reads_the_machine(monkeypatch):
    monkeypatch.delenv(budget.MEMORY_ENV, raising=False)
    have, source = budget.available_memory()
    assert have > 2**26 and source  # a test machine has more than 64 MiB free


def test_bounds_estimate_counts_the_monte_carlo_and_subsamples():
    from residual_probe.jobs.bounds import BoundsSpec

    est = budget.bounds_estimate(BoundsSpec(depths=(100000,)))
    assert (
        est.parts["collapse Monte-Carlo"] > 40 * 2**30
    )  # (100001, 64, 1024) float64, three copies
    assert est.parts["token subsamples"] > 10 * 2**30
    small = budget.bounds_estimate(BoundsSpec(depths=(12,), d_model=32, heads=2, ffn=64, seeds=1))
    assert small.peak_bytes < 200 * 2**20


def test_grad_norms_ckpt_checks_its_budget_and_honours_force(tmp_path, monkeypatch):
    """grad-norms --ckpt estimates its one gradient before running it: over the limit it is one line and
    exit 2; --force runs it anyway."""
    from residual_probe.checkpoints import save_model
    from residual_probe.models import build_model

    save_model(
        build_model(
            ModelConfig(
                arch="decoder", placement="pre-ln", depth=2, d_model=16, heads=2, ffn=24, max_len=32
            )
        ),
        tmp_path / "m",
    )
    args = ["grad-norms", "--ckpt", str(tmp_path / "m"), "--tokens", "64", "--seq-len", "32"]
    monkeypatch.setenv(budget.MEMORY_ENV, "64KiB")  # the limit, not a huge model
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2
    line = one_error_line(refused)
    assert "the gradient of m" in line and "this machine has 64.0 KiB RESIDUAL_PROBE_MEMORY" in line
    assert "--force" in line and not (tmp_path / "a" / "grad_norms.csv").exists()
    forced = CliRunner().invoke(app, [*args, "--force", "--out", str(tmp_path / "b")])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "b" / "grad_norms.csv").is_file()
    assert json.loads((tmp_path / "b" / "grad_norms.json").read_text())["spec"]["force"] is True
