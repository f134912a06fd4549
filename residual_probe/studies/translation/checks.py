"""The study's claims as rows of checks.csv: the regime's rules, the gate, then the paper's table.

Every comparison of two recipes uses `analysis.significance` (sacrebleu's paired bootstrap per
seed pair, and agreement of all seeds); the regime rules are `analysis.regime`'s.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from ...analysis import regime, significance
from ...analysis.checks import Check, fmt

# The rule until issue 34 (held-out BLEU under this, or a loss no better than the unigram): added
# during the first grid, kept computable beside the rule fixed before the next (`Cells.failed`).
FAILED_BLEU = 1.0
# A run "uses its source" from the first evaluation whose held-out loss is this far (nats per
# target token) below its shuffled-source loss; at initialization the two differ by about 0.02.
SOURCE_MARGIN = 0.1

# The paper's Table (IWSLT'14 De-En BLEU); None: not reported, "fail": did not train.
PAPER_BLEU = {
    (6, "post-ln", True): 35.37,
    (6, "pre-ln", True): 35.12,
    (6, "residual", True): 35.63,
    (12, "post-ln", True): "fail",
    (12, "pre-ln", True): 35.18,
    (12, "residual", True): 36.09,
    (6, "post-ln", False): None,
    (6, "pre-ln", False): 32.28,
    (6, "residual", False): 35.76,
    (12, "post-ln", False): None,
    (12, "pre-ln", False): 31.82,
    (12, "residual", False): 35.57,
}


class Cells:
    """The finished runs by cell (depth, placement, warmup, lr, alpha) and seed, with the bars a run
    is judged against and, when given, each held-out unit's sentence (`task.heldout_clusters`:
    the comparisons then carry sentence-bootstrap intervals) and each run's logged evaluations."""

    def __init__(
        self,
        results: list[dict],
        refs: list[str],
        bigram: float,
        unigram: float,
        clusters: list[int] | None = None,
        curves: dict[str, list[dict]] | None = None,
    ):
        self.refs, self.bigram, self.unigram = refs, bigram, unigram
        self.clusters, self.curves = clusters, curves or {}
        self.runs: dict[tuple, dict[int, dict]] = defaultdict(dict)
        for r in results:
            s = r["spec"]
            self.runs[s["depth"], s["placement"], s["warmup"], s["lr"], s["alpha"]][s["seed"]] = r

    def get(self, depth, placement, warmup, lr, alpha=1.0) -> dict[int, dict]:
        return self.runs.get((depth, placement, warmup, lr, alpha), {})

    def failed(self, r: dict) -> bool:
        """The failure rule, fixed before the grid (docs/design.md section 7): the run diverged, or
        its held-out loss at the end of its budget is not below the source-blind target bigram's
        (`task.bigram_loss`): it has not used its source for anything a target-side model without
        it could not do. A failure within the budget, not a proof that more steps would not help."""
        return not (math.isfinite(r["heldout_loss"]) and r["heldout_loss"] < self.bigram)

    def failed_bleu(self, r: dict) -> bool:
        """The rule used until issue 34, kept to show both: diverged, held-out loss no better than
        the unigram frequencies, or held-out BLEU under FAILED_BLEU."""
        return not (
            math.isfinite(r["heldout_loss"])
            and r["heldout_loss"] < self.unigram
            and r["bleu"] >= FAILED_BLEU
        )

    def source_step(self, r: dict) -> int | None:
        """The first evaluated step at which the run's held-out loss is SOURCE_MARGIN below its
        shuffled-source loss ("starts using its source"); None if no evaluation is."""
        return source_step(self.curves.get(r["name"], []))

    def status(self, r: dict) -> str:
        """One run against the bars: its loss, the shuffled-source control, BLEU, both rules."""
        logged = shuffled_logged(self.curves.get(r["name"], []))
        step = self.source_step(r)
        uses = (
            "not logged (run before the control)"
            if not logged
            else "never"
            if step is None
            else f"from step {step}"
        )
        stop = (
            ""
            if not r["spec"].get("min_steps")
            else ", cap hit before the rule held"
            if capped(r)
            else ", levelled off"
        )
        return (
            f"{r['steps_done']} steps{stop}, "
            f"loss {fmt(r['heldout_loss'])}, shuffled-source {fmt(r.get('shuffled_loss', math.nan))}, "
            f"BLEU {r['bleu']:.2f}, uses its source: {uses}; "
            f"failed: {'yes' if self.failed(r) else 'no'} (old rule: "
            f"{'yes' if self.failed_bleu(r) else 'no'})"
        )

    def bleu(self, cell) -> float:
        rs = self.get(*cell)
        return float(np.mean([r["bleu"] for r in rs.values()])) if rs else math.nan

    def mean_interval(self, a, b) -> str:
        """The seed-mean difference of cell a against b with its interval (seeds and sentences
        resampled, `significance.seed_mean_interval`), over the seeds both cells have."""
        ra, rb = self.get(*a), self.get(*b)
        seeds = sorted(set(ra) & set(rb))
        iv = significance.seed_mean_interval(
            [ra[s]["hypotheses"] for s in seeds],
            [rb[s]["hypotheses"] for s in seeds],
            self.refs,
            self.clusters,
        )
        return (
            f"seed mean {iv.text()} (95 %, {len(seeds)} seed{'s' * (len(seeds) > 1)} and "
            f"{iv.clusters} sentences resampled)"
        )

    def pairs(self, a, b) -> list[significance.Paired]:
        """Paired bootstrap of cell a against cell b, one per seed both have (with the sentence
        interval when the units' sentences are known)."""
        ra, rb = self.get(*a), self.get(*b)
        return [
            significance.paired_bleu(
                ra[s]["hypotheses"], rb[s]["hypotheses"], self.refs, self.clusters
            )
            for s in sorted(set(ra) & set(rb))
        ]


def shuffled_logged(curve: list[dict]) -> bool:
    """The run logged its shuffled-source loss (runs trained before the control did not)."""
    return any(math.isfinite(row.get("shuffled_loss", math.nan)) for row in curve)


def source_step(curve: list[dict], margin: float = SOURCE_MARGIN) -> int | None:
    """The first evaluated step whose held-out loss is `margin` below the shuffled-source loss."""
    for row in curve:
        if row.get("heldout_loss", math.nan) < row.get("shuffled_loss", math.nan) - margin:
            return int(row["step"])
    return None


def compare(cells: Cells, statement: str, setting: str, placement: str, paper: str, a, b) -> Check:
    """The claim "a > b" (BLEU), resolved beyond sentence and seed noise; where a run of either
    cell hit its step cap before the convergence rule held, the verdict is the fitted asymptotes'
    (`extrapolated`)."""
    pairs = cells.pairs(a, b)
    if not pairs:
        return Check(statement, setting, placement, paper, "not run", "not run")
    measured = f"{cells.bleu(a):.2f} vs {cells.bleu(b):.2f}; " + (
        f"{cells.mean_interval(a, b)}; " if cells.clusters is not None else ""
    )
    measured += significance.describe(pairs)
    verdict = significance.resolve(pairs)
    ext = extrapolated(cells, a, b)
    if ext is not None:
        text, verdict = ext
        measured = f"{text}; at the stop: {measured}"
    return Check(statement, setting, placement, paper, measured, verdict)


def capped(r: dict) -> bool:
    """The run trained to the convergence rule but stopped at its cap before the rule held."""
    return (
        bool(r["spec"].get("min_steps"))
        and not r.get("converged")
        and r.get("diverged_at_step") is None
    )


def bleu_asymptote(curve: list[dict]):
    """`regime.asymptote` of a run's BLEU points (None when it cannot be fitted)."""
    pts = [(row["step"], row["bleu"]) for row in curve if math.isfinite(row.get("bleu", math.nan))]
    return regime.asymptote(*zip(*pts), upper=100.0) if pts else None


def extrapolated(cells: Cells, a, b) -> tuple[str, str] | None:
    """(text, verdict) of "a > b" from each run's fitted BLEU asymptote, when a run of either cell
    hit its cap; None when every run stopped by the rule (or diverged). "yes"/"no" when the 95 %
    interval of the seed-mean asymptote difference excludes 0 and every level is identified
    (`regime.Asymptote.identified`), else "not resolved"."""
    ra, rb = cells.get(*a), cells.get(*b)
    seeds = sorted(set(ra) & set(rb))
    hit = sorted(r["name"] for r in [*ra.values(), *rb.values()] if capped(r))
    if not hit or not seeds:
        return None
    fa = [bleu_asymptote(cells.curves.get(ra[s]["name"], [])) for s in seeds]
    fb = [bleu_asymptote(cells.curves.get(rb[s]["name"], [])) for s in seeds]
    head = f"extrapolated (cap hit: {', '.join(hit)})"
    if any(f is None for f in fa + fb):
        return f"{head}: an asymptote could not be fitted", "not resolved"
    mean, low, high = significance.fitted_difference_interval(
        [f[:2] for f in fa], [f[:2] for f in fb]
    )
    per = ", ".join(f"s{s}: {x.level:.1f} vs {y.level:.1f}" for s, x, y in zip(seeds, fa, fb))
    text = (
        f"{head}: fitted BLEU asymptotes {per}; seed mean of the difference {mean:+.2f} "
        f"[{low:+.2f}, {high:+.2f}] (95 %, seeds and fits resampled)"
    )
    names = [ra[s]["name"] for s in seeds] + [rb[s]["name"] for s in seeds]
    unknown = [f"{n}: {f.why_not()}" for n, f in zip(names, fa + fb) if not f.identified]
    if unknown:  # a level the data do not determine decides nothing
        return f"{text}; level not identified for {'; '.join(unknown)}", "not resolved"
    return text, "yes" if low > 0 else "no" if high < 0 else "not resolved"


def regime_checks(
    cells: Cells,
    cal: Cells,
    curves: dict[str, list[dict]],
    n0: int,
    lr: float,
    lr_rule: str,
    setting: str,
) -> tuple[list[Check], bool]:
    """The rules the regime was chosen by (from the calibration runs `cal`), the convergence of the
    claim runs (`cells`), the gate, and the baselines' known facts. Returns the rows and whether
    the gate passed (at the main lr, seed means)."""
    arms = sorted(
        {
            k[3]
            for k in cal.runs
            if k[0] == n0
            and k[2]
            and 0 in cal.get(n0, "pre-ln", True, k[3])
            and 0 in cal.get(n0, "post-ln", True, k[3])
        }
    )
    passing = [
        a
        for a in arms
        if regime.gate_passes(
            cal.get(n0, "post-ln", True, a)[0]["bleu"],
            cal.get(n0, "pre-ln", True, a)[0]["bleu"],
        )
    ]
    # the rule binds when it excludes an arm; when every arm passes it just takes the largest arm
    bound = (
        f"; the rule bound (excluded lr {', '.join(f'{a:g}' for a in arms if a not in passing)})"
        if passing and len(passing) < len(arms)
        else "; the rule did not bind (every arm passed: the largest arm was taken)"
        if passing
        else ""
    )
    rows = [
        Check(
            f"Some peak lr lets the baselines pass the gate (calibration: E{n0}D{n0}, warm-up, seed 0, "
            "3000 steps); the main lr is the largest such",
            setting,
            "post-ln, pre-ln",
            "rule: largest lr at which the gate passes (else the smallest gap, outside the paper's regime)",
            f"lr {lr:g}: {lr_rule}{bound}",
            ("yes" if passing else "no") if arms else "not run",
        )
    ]
    claim_runs = [
        r
        for per_seed in cells.runs.values()
        for r in per_seed.values()
        if r["spec"].get("min_steps")
    ]
    capped = sorted(r["name"] for r in claim_runs if not r.get("converged"))
    steps = [r["steps_done"] for r in claim_runs]
    rows.append(
        Check(
            f"The claim runs level off within the cap (held-out loss, each end the mean of "
            f"{regime.CONVERGED_WINDOW} evaluations, improves < {100 * regime.CONVERGED_REL:g} % "
            f"over the last {100 * regime.CONVERGED_TAIL:g} % of steps; checked at every BLEU "
            "point from the minimum budget on)",
            setting,
            "post-ln, pre-ln, residual",
            "rule: stop when it holds; where the cap is hit, the claim is extrapolated",
            (
                f"{len(claim_runs) - len(capped)}/{len(claim_runs)} runs stopped by the rule "
                f"(steps {min(steps)}-{max(steps)})"
                + (f"; hit the cap: {', '.join(capped)}" if capped else "")
            )
            if claim_runs
            else "not run",
            ("yes" if not capped else "no") if claim_runs else "not run",
        )
    )
    post, pre_c = (n0, "post-ln", True, lr), (n0, "pre-ln", True, lr)
    pb, qb = cells.bleu(post), cells.bleu(pre_c)
    pairs = cells.pairs(post, pre_c)
    passed = regime.gate_passes(pb, qb)
    rows.append(
        Check(
            f"Gate: Post-LN E{n0}D{n0} with warm-up trains, within {regime.GATE_BLEU:g} BLEU of Pre-LN "
            "(seed means)",
            setting,
            "post-ln",
            "paper: 35.37 vs 35.12",
            f"{pb:.2f} vs {qb:.2f} ({pb - qb:+.2f})" if pairs else "not run",
            ("yes" if passed else "no") if pairs else "not run",
        )
    )
    # the gate is a regime rule, not the paper's "as good as": that is its own paired comparison
    rows.append(
        compare(
            cells,
            f"Post-LN E{n0}D{n0} with warm-up is as good as Pre-LN (Post-LN > Pre-LN)",
            setting,
            "post-ln",
            "paper: 35.37 vs 35.12 (Post-LN 0.25 ahead)",
            post,
            pre_c,
        )
    )
    nw = cells.get(n0, "pre-ln", False, lr)
    rows.append(
        Check(
            f"Pre-LN E{n0}D{n0} trains without warm-up (held-out loss below the source-blind bigram "
            f"loss {cells.bigram:.2f} at the end of the budget)",
            setting,
            "pre-ln",
            "field: Pre-LN needs no warm-up (Xiong et al. 2020)",
            "; ".join(f"s{s}: {cells.status(r)}" for s, r in sorted(nw.items())) or "not run",
            ("yes" if not any(cells.failed(r) for r in nw.values()) else "no") if nw else "not run",
        )
    )
    return rows, passed


def paper_checks(
    cells: Cells, n0: int, n1: int, lr: float, setting: str, gate_passed: bool
) -> list[Check]:
    """The paper's claims, each at the main lr (the E6D6 warm-up ones at every lr arm)."""
    where = setting if gate_passed else setting + "; OUTSIDE the paper's regime: the gate failed"
    rows = []
    for arm in sorted({k[3] for k in cells.runs if k[0] == n0 and k[2]}):
        rows.append(
            compare(
                cells,
                f"ResiDual > Post-LN at E{n0}D{n0} (warm-up, lr {arm:g})",
                where,
                "residual",
                "paper: 35.63 vs 35.37",
                (n0, "residual", True, arm),
                (n0, "post-ln", True, arm),
            )
        )
        rows.append(
            compare(
                cells,
                f"ResiDual > Pre-LN at E{n0}D{n0} (warm-up, lr {arm:g})",
                where,
                "residual",
                "paper: 35.63 vs 35.12",
                (n0, "residual", True, arm),
                (n0, "pre-ln", True, arm),
            )
        )
    post1 = cells.get(n1, "post-ln", True, lr)
    nfail = sum(cells.failed(r) for r in post1.values())
    nold = sum(cells.failed_bleu(r) for r in post1.values())
    rows.append(
        Check(
            f"Post-LN fails to train at E{n1}D{n1} (warm-up) within the budget",
            where,
            "post-ln",
            "paper: fails",
            f"failed seeds {nfail}/{len(post1)} (held-out loss at the end of the budget not below "
            f"the source-blind bigram loss {cells.bigram:.2f}, or diverged); old rule (BLEU < "
            f"{FAILED_BLEU:g}, loss >= unigram {cells.unigram:.2f} or diverged) {nold}/{len(post1)}; "
            + "; ".join(f"s{s}: {cells.status(r)}" for s, r in sorted(post1.items())),
            ("yes" if nfail == len(post1) else "no" if nfail == 0 else "not resolved")
            if post1
            else "not run",
        )
    )
    rows.append(
        compare(
            cells,
            f"ResiDual > Post-LN at E{n1}D{n1} (warm-up)",
            where,
            "residual",
            "paper: 36.09 vs fail",
            (n1, "residual", True, lr),
            (n1, "post-ln", True, lr),
        )
    )
    rows.append(
        compare(
            cells,
            f"ResiDual > Pre-LN at E{n1}D{n1} (warm-up)",
            where,
            "residual",
            "paper: 36.09 vs 35.18",
            (n1, "residual", True, lr),
            (n1, "pre-ln", True, lr),
        )
    )
    for n, paper_pre, paper_res in (
        (n0, "32.28 vs 35.12", "35.76 vs 35.63"),
        (n1, "31.82 vs 35.18", "35.57 vs 36.09"),
    ):
        pre = compare(
            cells,
            f"Pre-LN loses BLEU without warm-up at E{n}D{n}",
            where,
            "pre-ln",
            f"paper: {paper_pre}",
            (n, "pre-ln", True, lr),
            (n, "pre-ln", False, lr),
        )
        rows.append(pre)
        rows.append(
            compare(
                cells,
                f"ResiDual without warm-up > Pre-LN without warm-up at E{n}D{n}",
                where,
                "residual",
                f"paper: {paper_res.split(' vs ')[0]} vs {paper_pre.split(' vs ')[0]}",
                (n, "residual", False, lr),
                (n, "pre-ln", False, lr),
            )
        )
    rows.append(
        compare(
            cells,
            f"ResiDual's alpha*x output term helps at E{n0}D{n0} (alpha 1 > alpha 0, warm-up)",
            where,
            "residual",
            "the paper's default alpha = 1",
            (n0, "residual", True, lr, 1.0),
            (n0, "residual", True, lr, 0.0),
        )
    )
    return rows


def stream_checks(summary: dict[str, dict[int, dict]], setting: str) -> list[Check]:
    """What ResiDual's output relies on, early and late: mean-ablation costs of alpha*x and LN_f(d).

    summary: run label -> {step: {"ablate_x", "ablate_d", ...}} (one run per label)."""
    rows = []
    for label, per_step in summary.items():
        if not per_step:
            continue
        steps = sorted(per_step)
        first = next((s for s in steps if s > 0), steps[0])
        last = steps[-1]
        series = ", ".join(
            f"step {s}: x {per_step[s]['ablate_x']:+.3f} / d {per_step[s]['ablate_d']:+.3f}"
            for s in steps
        )
        rows.append(
            Check(
                f"ResiDual's alpha*x term carries more of the output late in training than early ({label})",
                setting,
                "residual",
                "held-out loss increase from mean-ablating alpha*x grows from the first to the last BLEU point",
                f"nats, x / d ablated: {series}",
                "yes" if per_step[last]["ablate_x"] > per_step[first]["ablate_x"] else "no",
            )
        )
    return rows


def depth_gate(shallow: list[float], deep: list[float]) -> bool:
    """More layers help beyond the seed spread: every deep seed's BLEU above every shallow one's
    (with 2-3 seeds a paired interval per seed pair says less than this spread rule)."""
    return bool(shallow and deep) and min(deep) > max(shallow)


def depth_checks(cells: Cells, n0: int, n1: int, lr: float, setting: str) -> list[Check]:
    """The depth gate and the claim it guards, on a task where depth can matter (issue 34).

    The gate: Pre-LN E{n1}D{n1} beats E{n0}D{n0} (warm-up, main lr) beyond the seed spread
    (`depth_gate`). Only when it passes is "ResiDual's extra layers help where Pre-LN's do not"
    tested: ResiDual's gain from depth (deep minus shallow BLEU, per seed) above Pre-LN's in every
    seed both cells have ("no": below in every seed); on a task where depth does not help Pre-LN,
    Pre-LN's collapse cannot cost anything, so the claim has nothing to show."""
    pre0, pre1 = (n0, "pre-ln", True, lr), (n1, "pre-ln", True, lr)
    shallow = [r["bleu"] for r in cells.get(*pre0).values()]
    deep = [r["bleu"] for r in cells.get(*pre1).values()]
    passed = depth_gate(shallow, deep)
    pairs = cells.pairs(pre1, pre0)
    hit = sorted(r["name"] for c in (pre1, pre0) for r in cells.get(*c).values() if capped(r))
    gate = Check(
        f"Pre-LN E{n1}D{n1} beats E{n0}D{n0} beyond the seed spread (depth gate)",
        setting,
        "pre-ln",
        "rule: min of the deep seeds' BLEU above max of the shallow seeds'",
        (
            f"E{n1}D{n1} {' '.join(f'{b:.2f}' for b in deep)} vs E{n0}D{n0} "
            f"{' '.join(f'{b:.2f}' for b in shallow)}"
            + (f"; {cells.mean_interval(pre1, pre0)}" if pairs and cells.clusters else "")
            + (f"; {significance.describe(pairs)}" if pairs else "")
            + (f"; stopped at the cap before the rule held: {', '.join(hit)}" if hit else "")
        )
        if shallow and deep
        else "not run",
        ("yes" if passed else "no") if shallow and deep else "not run",
    )
    statement = f"ResiDual's extra layers help where Pre-LN's do not (E{n1}D{n1} - E{n0}D{n0} BLEU)"
    if not passed:
        measured = verdict = "not tested: depth gate did not pass"
    else:
        gains = {}
        for p in ("residual", "pre-ln"):
            a, b = cells.get(n1, p, True, lr), cells.get(n0, p, True, lr)
            gains[p] = {s: a[s]["bleu"] - b[s]["bleu"] for s in set(a) & set(b)}
        seeds = sorted(set(gains["residual"]) & set(gains["pre-ln"]))
        diff = [gains["residual"][s] - gains["pre-ln"][s] for s in seeds]
        measured = "; ".join(
            f"s{s}: ResiDual {gains['residual'][s]:+.2f}, Pre-LN {gains['pre-ln'][s]:+.2f}"
            for s in seeds
        )
        verdict = (
            "yes"
            if diff and min(diff) > 0
            else "no"
            if diff and max(diff) < 0
            else "not resolved"
            if diff
            else "not run"
        )
        measured = measured or "not run"
    claim = Check(
        statement,
        setting,
        "residual",
        "paper: Pre-LN's deep layers collapse, ResiDual's keep contributing",
        measured,
        verdict,
    )
    return [gate, claim]
