"""The studies behind `residual-probe figures`: one module per paper figure or claim.

A study is a module `residual_probe/studies/<name>.py` with
- a docstring whose first line says what it shows (the `--help` of `python analyses/<name>.py`);
- `run(out: Path, quick: bool = False) -> list[Check]`: measure through the library, write its
  figures and tables into `out` (named `<name>*.png`, `<name>*.csv`), and return the claims it
  confronts with the measurement as `residual_probe.analysis.checks.Check` rows (statement,
  setting, placement, predicted, measured, agreement). `quick` picks small sizes (CI, tests).

To add a study: write the module (or package), add its name to `STUDIES` (the order is the run
order; a study may read what an earlier one wrote into `out`), and add a two-line entry point
`analyses/<name>.py` calling `main("<name>")`. Studies ship inside the package, so
`residual-probe figures` runs from an installed wheel in any folder.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Callable

from ..errors import UserError

STUDIES = (
    "grad_norms_depths",  # per-layer gradient norms at init, depths 6..48 (ResiDual Fig. 2a analogue)
    "theory_bounds",  # Xiong Lemma 2 and Theorem 1, ResiDual's gradient floor, Adam's condition number
    "training_study",  # training on CPU: warm-up or not, loss, gradients, collapse
    "collapse_theory",  # adjacent cosine / normalized update per layer: closed forms, init, trained (reads training_study's runs)
    "translation",  # the paper's E6D6/E12D12 translation table at CPU scale, in a regime its baselines pass
    "instability",  # lr sweep with and without QK-norm: attention-logit growth, precursor lead time
    "all_placements",  # every registered placement: gradients at init (N 6-48), a short run without warm-up
)
CHECK_COLUMNS = (
    "study",
    "statement",
    "setting",
    "placement",
    "predicted",
    "measured",
    "agreement",
)


class StudyError(UserError):
    """An unknown study name; one line for the user."""


def load(name: str) -> ModuleType:
    """The study module `name` (one of STUDIES)."""
    if name not in STUDIES:
        raise StudyError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    return importlib.import_module(f"{__name__}.{name}")


def keep_other_checks(path: Path, rerun: tuple[str, ...]) -> list[dict]:
    """Rows of an existing checks.csv from studies not rerun now, so `--only` updates in place."""
    import pandas as pd

    if not path.is_file():
        return []
    df = pd.read_csv(path, dtype=str, keep_default_na=False)  # text as written: "nan" stays "nan"
    if "study" not in df:
        return []
    return df[df["study"].isin(STUDIES) & ~df["study"].isin(rerun)].to_dict("records")


def check_rows(name: str, checks) -> list[dict]:
    """The rows of checks.csv for study `name`'s checks (CHECK_COLUMNS)."""
    return [{"study": name, **asdict(c)} for c in checks]


def _echo(line: str, err: bool = False) -> None:
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def run_all(
    out: str | Path,
    quick: bool = False,
    only: tuple[str, ...] = (),
    echo: Callable[..., None] = _echo,
) -> dict:
    """Run the studies (all, or `only`) into `out`; write OUT/checks.csv and OUT/checks.json.

    `echo(line, err=...)` hears each study's start (err=True, progress) and its checks (results).

    Returns the checks.json content: {"job", "quick", "studies", "seconds", "versions", "checks"}.
    """
    from ..output import prepare_out, versions, write_csv, write_json

    names = tuple(only) or STUDIES
    modules = {name: load(name) for name in names}  # fail on a bad name before any work
    out = prepare_out(out)
    checks, timings = [], {}
    for name, module in modules.items():
        echo(f"== {name} ({'quick' if quick else 'full'})", err=True)  # progress
        t0 = time.perf_counter()
        found = module.run(out, quick)
        timings[name] = round(time.perf_counter() - t0, 1)
        for c in found:
            echo("  " + c.line(), err=False)  # a check is a result
        checks += check_rows(name, found)
    rows = keep_other_checks(out / "checks.csv", names) + checks
    write_csv(out / "checks.csv", rows, CHECK_COLUMNS)
    meta = {
        "job": "figures",
        "quick": quick,
        "studies": list(names),
        "seconds": timings,
        "versions": versions(),
        "checks": rows,
    }
    write_json(out / "checks.json", meta)
    return meta


def held_out_forward_stats(model, batch: int, seq_len: int, seed: int) -> list[dict]:
    """Probe rows of the forward statistics (stream x) of a decoder LM on one seeded batch of
    held-out text (the last 5 % of the built-in corpus), in eval mode without gradients."""
    import torch

    from ..data import BatchSource, builtin_corpus, split_tokens
    from ..probe import Probe

    _, val = split_tokens(builtin_corpus())
    inputs = BatchSource("decoder", batch, seq_len, model.cfg.vocab_size, seed, val).next().inputs
    probe = Probe(model.eval(), quantities=("forward_stats",), include_eval=True)
    with probe, torch.no_grad():
        model(*inputs)
        probe.step()
    return [r for r in probe.rows() if r["stream"] == "x"]


def main(name: str) -> None:
    """The command line of one study: `python analyses/<name>.py [--out DIR] [--quick]`."""
    import argparse

    module = load(name)
    ap = argparse.ArgumentParser(description=(module.__doc__ or name).strip().splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("figures"))
    ap.add_argument("--quick", action="store_true", help="small sizes, as CI runs it")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for c in module.run(args.out, args.quick):
        print(c.line())
