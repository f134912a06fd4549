"""The `figures` job: run every script in analyses/, collect their checks, write a checks table.

Each analysis script defines `run(out: Path, quick: bool) -> list[Check]`: it measures through
the library, writes its figure and CSV into `out`, and returns the claims it confronts with
what it measured. The scripts live in the repository (analyses/), beside the package.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ANALYSES = (
    "grad_norms_depths",  # per-layer gradient norms at init, depths 6..48 (ResiDual Fig. 2a analogue)
    "w2_vs_depth",  # last block's W2 gradient against depth (Xiong et al. Thm 1)
    "norm_growth",  # hidden-state norm growth against Xiong et al. Lemma 2
    "adam_condition",  # Adam update condition number against gradient scale (ResiDual appendix)
    "training_study",  # training on CPU: warm-up or not, loss, gradients, collapse
    "collapse_theory",  # adjacent cosine / normalized update per layer: closed forms, init, trained
)


class AnalysisError(ValueError):
    """An analysis cannot be found or run; one line for the user."""


@dataclass
class Check:
    """One claim confronted with a measurement. `agrees` is None where no verdict is possible."""

    analysis: str
    claim: str
    predicted: str
    measured: str
    agrees: bool | None
    note: str = ""

    def line(self) -> str:
        mark = {True: "agrees", False: "DISAGREES", None: "reported"}[self.agrees]
        return f"[{mark:>9}] {self.claim}: predicted {self.predicted}; measured {self.measured}" + (
            f" ({self.note})" if self.note else "")


def fmt(x: float, digits: int = 3) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}g}"


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
            echo("  " + c.line())
        checks += found
    rows = [asdict(c) for c in checks]
    write_csv(out / "checks.csv", rows, ("analysis", "claim", "predicted", "measured", "agrees", "note"))
    meta = {"job": "figures", "quick": quick, "analyses": list(names), "seconds": timings,
            "versions": versions(), "checks": rows}
    write_json(out / "checks.json", meta)
    return meta
