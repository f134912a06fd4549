"""The ResiDual paper's translation experiment at CPU scale: encoder-decoder across depth, placement and warm-up.

The study lives in residual_probe/studies/translation/; `residual-probe figures --only
translation` runs it like the other studies. This script adds what a long grid needs:
    python analyses/translation.py [--out figures] [--quick] [--workers 2] [--partial] [--task T]
                                   [--max-steps N]
The grid is resumable (rerun the same command after an interruption: finished runs are kept);
--partial trains nothing and writes the tables, figures and checks from the runs finished so far.
--max-steps raises the cap of the runs to the convergence rule: a run that hit the lower cap goes
on from its saved state, and equals the run trained to the new cap at once.
The checks replace this study's rows in OUT/checks.csv and keep the others.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from residual_probe.studies.translation import run
from residual_probe.studies.translation.task import DEFAULT_TASK, TASKS

NAME = "translation"


def write_checks(out: Path, checks) -> None:
    """OUT/checks.csv and OUT/checks.json with this study's rows replaced; rows of other studies
    are kept, rows of names no longer in STUDIES (a renamed study) dropped."""
    import json

    from residual_probe.output import write_csv, write_json
    from residual_probe.studies import CHECK_COLUMNS, STUDIES, check_rows, keep_other_checks

    rows = keep_other_checks(out / "checks.csv", (NAME,)) + check_rows(NAME, checks)
    write_csv(out / "checks.csv", rows, CHECK_COLUMNS)
    meta_path = out / "checks.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        meta["checks"] = rows
        meta["studies"] = [name for name in STUDIES if any(r["study"] == name for r in rows)]
        meta["seconds"] = {k: v for k, v in meta.get("seconds", {}).items() if k in STUDIES}
        write_json(meta_path, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("figures"))
    ap.add_argument("--quick", action="store_true", help="small sizes, as CI runs it")
    ap.add_argument(
        "--workers", type=int, default=None, help="runs in parallel (default: 2, quick: 1)"
    )
    ap.add_argument(
        "--partial", action="store_true", help="train nothing; write results from finished runs"
    )
    ap.add_argument(
        "--task",
        default=DEFAULT_TASK,
        choices=sorted(TASKS),
        help="words (the paper's table) or characters (the depth gate; under OUT/<task>/)",
    )
    ap.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="cap of a run to the convergence rule (default 6000); finished runs go on to it",
    )
    args = ap.parse_args()
    if args.max_steps is not None and args.max_steps < 1:
        ap.error("--max-steps: must be a positive number of steps")
    args.out.mkdir(parents=True, exist_ok=True)
    checks = run(
        args.out,
        args.quick,
        args.workers,
        train=not args.partial,
        task=args.task,
        cap=args.max_steps,
    )
    write_checks(args.out if args.task == DEFAULT_TASK else args.out / args.task, checks)
    for c in checks:
        print(
            f"[{c.agreement}] {c.statement} ({c.setting}): predicted {c.predicted}; measured {c.measured}"
        )


if __name__ == "__main__":
    main()
