"""The `figures` job: run every script in analyses/, collect their checks, write a checks table.

Each analysis script defines `run(out: Path, quick: bool) -> list[Check]` (the
`residual_probe.analysis.checks.Check` rows: statement, setting, placement, predicted, measured,
agreement): it measures through the library, writes its figures and CSV into `out`, and returns
the claims it confronts with what it measured. The scripts live in the repository (analyses/).
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import asdict
from pathlib import Path

ANALYSES = (
    "grad_norms_depths",  # per-layer gradient norms at init, depths 6..48 (ResiDual Fig. 2a analogue)
    "theory_bounds",  # Xiong Lemma 2 and Theorem 1, ResiDual's gradient floor, Adam's condition number
    "training_study",  # training on CPU: warm-up or not, loss, gradients, collapse
    "collapse_theory",  # adjacent cosine / normalized update per layer: closed forms, init, trained
    "translation_study",  # the paper's E6D6/E12D12 translation grid at CPU scale, and the LM gap explained
)


class AnalysisError(ValueError):
    """An analysis cannot be found or run; one line for the user."""


def fmt(x: float, digits: int = 3) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}g}"


def verdict(ok: bool) -> str:
    return "yes" if ok else "no"


def check_line(c) -> str:
    return f"[{c.agreement}] {c.statement} ({c.setting}, {c.placement}): predicted {c.predicted}; measured {c.measured}"


def script_main(run, doc: str) -> None:
    """The command line of one analysis script: `python analyses/NAME.py [--out DIR] [--quick]`."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("figures"))
    ap.add_argument("--quick", action="store_true", help="small sizes, as CI runs it")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for c in run(args.out, args.quick):
        print(check_line(c))


def analyses_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "analyses"
    if not here.is_dir():
        raise AnalysisError(f"analyses/ not found beside the package ({here}); run from a clone of the repository")
    return here


def load_analysis(name: str):
    path = analyses_dir() / f"{name}.py"
    if not path.is_file():
        raise AnalysisError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
    spec = importlib.util.spec_from_file_location(f"analyses.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHECK_COLUMNS = ("analysis", "statement", "setting", "placement", "predicted", "measured", "agreement")


def keep_other_checks(path: Path, rerun: tuple[str, ...]) -> list[dict]:
    """Rows of an existing checks.csv from analyses not rerun now, so `--only` updates in place."""
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("analysis") not in rerun and r.get("analysis") in ANALYSES]


def run_figures(out: str | Path, quick: bool = False, only: tuple[str, ...] = (), echo=print) -> dict:
    """Run the analyses (all, or `only`), write OUT/checks.csv and OUT/checks.json."""
    from ..results import prepare_out, versions, write_csv, write_json

    out = prepare_out(out)
    names = only or ANALYSES
    modules = {name: load_analysis(name) for name in names}  # fail on a bad name before any work
    checks, timings = [], {}
    for name, module in modules.items():
        echo(f"== {name} ({'quick' if quick else 'full'})")
        t0 = time.perf_counter()
        found = module.run(out, quick)
        timings[name] = round(time.perf_counter() - t0, 1)
        for c in found:
            echo("  " + check_line(c))
        checks += [{"analysis": name, **asdict(c)} for c in found]
    rows = keep_other_checks(out / "checks.csv", names) + checks
    write_csv(out / "checks.csv", rows, CHECK_COLUMNS)
    meta = {"job": "figures", "quick": quick, "analyses": list(names), "seconds": timings,
            "versions": versions(), "checks": rows}
    write_json(out / "checks.json", meta)
    return meta
