"""Is one system better than another, beyond the noise of the test sentences and of the seeds?

A comparison of two training recipes A and B on the same held-out sentences has two sources of
noise: which sentences were drawn (sentence resampling) and which seed trained the model. The
sentence part is sacrebleu's paired bootstrap resampling (`sacrebleu.significance.PairedTest`,
test_type "bs": Koehn 2004, as Moses' script), run once per seed pair (A and B trained with the
same seed). The rule, one place for every claim of the studies:

- "yes": every seed pair has A - B > 0 with paired-bootstrap p < ALPHA;
- "no": every seed pair has A - B < 0 with p < ALPHA;
- "not resolved": anything else (the seeds disagree, or a difference is within the sentence noise).

So a claim holds only if it holds beyond both the sentence spread and the seed spread. The row
gives each seed's difference and p-value and the seed mean with its standard deviation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ALPHA = 0.05  # significance level of each seed pair's paired bootstrap
N_SAMPLES = 1000  # bootstrap resamples (sacrebleu's default for "bs")


@dataclass(frozen=True)
class Paired:
    """A - B in BLEU for one seed pair: the difference, its two-sided p-value, and each system's
    bootstrap 95 % half-width."""

    diff: float
    p_value: float
    ci_a: float
    ci_b: float


def paired_bleu(hyps_a: Sequence[str], hyps_b: Sequence[str], refs: Sequence[str]) -> Paired:
    """sacrebleu's paired bootstrap of system A against baseline B on the same references.

    The resampling is seeded (sacrebleu reads SACREBLEU_SEED, default 12345): reruns agree.
    """
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    test = PairedTest(
        [("B", list(hyps_b)), ("A", list(hyps_a))],
        {"BLEU": BLEU()},
        [list(refs)],
        test_type="bs",
        n_samples=N_SAMPLES,
    )
    _, scores = test()
    b, a = scores["BLEU"]
    return Paired(a.score - b.score, float(a.p_value), float(a.ci), float(b.ci))


def resolve(pairs: Sequence[Paired]) -> str:
    """The verdict of "A > B" from its seed pairs: "yes", "no" or "not resolved" (rule above)."""
    if not pairs or any(not math.isfinite(p.diff) for p in pairs):
        return "not resolved"
    significant = all(p.p_value < ALPHA for p in pairs)
    if significant and all(p.diff > 0 for p in pairs):
        return "yes"
    if significant and all(p.diff < 0 for p in pairs):
        return "no"
    return "not resolved"


def describe(pairs: Sequence[Paired]) -> str:
    """The interval text of a claim's row: seed mean +- sd, then each seed's difference and p."""
    if not pairs:
        return "no seed pair finished"
    d = np.array([p.diff for p in pairs])
    sd = f" +- {d.std(ddof=1):.2f} (sd over {len(d)} seeds)" if len(d) > 1 else " (1 seed)"
    per = ", ".join(f"{p.diff:+.2f} (p {p.p_value:.3f})" for p in pairs)
    return f"delta BLEU {d.mean():+.2f}{sd}; per seed {per}"
