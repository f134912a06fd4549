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
gives the seed mean with its standard deviation, and each seed's difference with its 95 %
sentence-bootstrap interval (below; when the units' sentences are known) and p-value.

The interval of a difference is `cluster_bootstrap`'s: the units scored are clauses cut from
sentences, and clauses of one sentence are not independent (a model that misreads a sentence
misreads its clauses), so it resamples whole sentences (clusters), each with all its units, and
gives the percentile interval of BLEU(A) - BLEU(B). Resampling units as if independent gives an
interval too narrow on such data (sacrebleu's PairedTest does that; it is kept for the p-values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ALPHA = 0.05  # significance level of each seed pair's paired bootstrap
N_SAMPLES = 1000  # bootstrap resamples (sacrebleu's default for "bs")
LEVEL = 0.95  # the interval of a difference
BOOTSTRAP_SEED = 12345  # sacrebleu's default SACREBLEU_SEED: reruns give the same interval


@dataclass(frozen=True)
class Paired:
    """A - B in BLEU for one seed pair: the difference, its two-sided p-value, each system's
    bootstrap 95 % half-width (sacrebleu's), and the difference's sentence-bootstrap interval
    (`cluster_bootstrap`; None when the units' sentences are not known)."""

    diff: float
    p_value: float
    ci_a: float
    ci_b: float
    interval: Interval | None = None


def paired_bleu(
    hyps_a: Sequence[str],
    hyps_b: Sequence[str],
    refs: Sequence[str],
    clusters: Sequence | None = None,
) -> Paired:
    """sacrebleu's paired bootstrap of system A against baseline B on the same references (the
    p-value), and with `clusters` (each unit's sentence) the interval of A - B resampling sentences.

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
    interval = None if clusters is None else cluster_bootstrap(hyps_a, hyps_b, refs, clusters)
    return Paired(a.score - b.score, float(a.p_value), float(a.ci), float(b.ci), interval)


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
    """The interval text of a claim's row: seed mean +- sd, then each seed's difference with its
    95 % sentence-bootstrap interval and p; "no interval: hypotheses not stored" where a seed pair
    has no interval (the units' sentences were not given)."""
    if not pairs:
        return "no seed pair finished"
    d = np.array([p.diff for p in pairs])
    sd = f" +- {d.std(ddof=1):.2f} (sd over {len(d)} seeds)" if len(d) > 1 else " (1 seed)"
    per = ", ".join(
        (p.interval.text() if p.interval is not None else f"{p.diff:+.2f}")
        + f" (p {p.p_value:.3f})"
        for p in pairs
    )
    note = (
        f"per seed [{100 * LEVEL:g} % sentence-bootstrap interval]"
        if all(p.interval is not None for p in pairs)
        else "no interval: hypotheses not stored; per seed"
    )
    return f"delta BLEU {d.mean():+.2f}{sd}; {note} {per}"


@dataclass(frozen=True)
class Interval:
    """BLEU(A) - BLEU(B) on the whole test set and its bootstrap interval over `clusters` sentences
    (`units` scored units in all)."""

    diff: float
    low: float
    high: float
    clusters: int
    units: int

    def text(self) -> str:
        return f"{self.diff:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def bleu_statistics(hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """(units, 10) sentence-level BLEU sufficient statistics (sacrebleu's: hypothesis and reference
    length, matched and total n-grams for n = 1..4); corpus BLEU is a function of their sum."""
    from sacrebleu.metrics import BLEU

    return np.array(BLEU()._extract_corpus_statistics(list(hyps), [list(refs)]), dtype=np.int64)


def bleu_from_statistics(total: np.ndarray) -> float:
    """Corpus BLEU (sacrebleu's defaults, as `BLEU().corpus_score`) from summed statistics."""
    from sacrebleu.metrics import BLEU

    return float(BLEU()._compute_score_from_stats([int(v) for v in total]).score)


def cluster_statistics(hyps: Sequence[str], refs: Sequence[str], clusters: Sequence) -> np.ndarray:
    """(sentences, 10) BLEU statistics summed over each cluster's units (`bleu_statistics`), rows in
    the sorted order of the cluster names: what a sentence-level bootstrap draws from."""
    _, which = np.unique(np.asarray(clusters), return_inverse=True)
    stats = bleu_statistics(hyps, refs)
    summed = np.zeros((int(which.max()) + 1, stats.shape[1]), dtype=np.int64)
    np.add.at(summed, which, stats)
    return summed


def resample_counts(k: int, n_samples: int, seed: int) -> np.ndarray:
    """(n_samples, k): how often each of k clusters is drawn in each resample of k draws with
    replacement (a multinomial), seeded."""
    return np.random.default_rng(seed).multinomial(k, np.full(k, 1.0 / k), size=n_samples)


def cluster_bootstrap(
    hyps_a: Sequence[str],
    hyps_b: Sequence[str],
    refs: Sequence[str],
    clusters: Sequence,
    n_samples: int = N_SAMPLES,
    level: float = LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """Paired bootstrap of BLEU(A) - BLEU(B) resampling clusters: `clusters[i]` names unit i's
    sentence; each resample draws as many sentences as there are, with replacement, and scores A
    and B on the same draw (all units of a drawn sentence, as often as it is drawn). The interval is
    the percentile interval of the resampled differences."""
    if not (len(hyps_a) == len(hyps_b) == len(refs) == len(clusters)) or not refs:
        raise ValueError("hypotheses, references and clusters must be equally long and not empty")
    per = [cluster_statistics(hyps, refs, clusters) for hyps in (hyps_a, hyps_b)]
    k = len(per[0])
    counts = resample_counts(k, n_samples, seed)
    diffs = np.array(
        [bleu_from_statistics(c @ per[0]) - bleu_from_statistics(c @ per[1]) for c in counts]
    )
    full = bleu_from_statistics(per[0].sum(0)) - bleu_from_statistics(per[1].sum(0))
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return Interval(full, float(low), float(high), k, len(refs))


def seed_mean_interval(
    hyps_a: Sequence[Sequence[str]],
    hyps_b: Sequence[Sequence[str]],
    refs: Sequence[str],
    clusters: Sequence,
    n_samples: int = N_SAMPLES,
    level: float = LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """The interval of the seed mean of BLEU(A_s) - BLEU(B_s) over seed pairs s (`hyps_a[s]`,
    `hyps_b[s]`): a two-level bootstrap that draws the seed pairs with replacement and, in the same
    resample, the sentences (`cluster_bootstrap`'s draw, shared by the seeds: they are scored on one
    test set). It carries both noises the rule above names; with 2-3 seeds its seed part is coarse."""
    if not hyps_a or len(hyps_a) != len(hyps_b):
        raise ValueError("one list of hypotheses per seed, as many for A as for B")
    per = [
        (cluster_statistics(a, refs, clusters), cluster_statistics(b, refs, clusters))
        for a, b in zip(hyps_a, hyps_b)
    ]
    k = len(per[0][0])
    n = len(per)
    counts = resample_counts(k, n_samples, seed)
    seeds = np.random.default_rng(seed + 1).integers(0, n, size=(n_samples, n))
    diff_cache: dict[tuple[int, int], float] = {}
    diffs = []
    for i, c in enumerate(counts):
        for s in set(seeds[i].tolist()):
            a, b = per[s]
            diff_cache[i, s] = bleu_from_statistics(c @ a) - bleu_from_statistics(c @ b)
        diffs.append(np.mean([diff_cache[i, s] for s in seeds[i]]))
    full = float(
        np.mean([bleu_from_statistics(a.sum(0)) - bleu_from_statistics(b.sum(0)) for a, b in per])
    )
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return Interval(full, float(low), float(high), k, len(refs))


def fitted_difference_interval(
    fits_a: Sequence[tuple[float, float]],
    fits_b: Sequence[tuple[float, float]],
    n_samples: int = N_SAMPLES,
    level: float = LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """(mean, low, high) of the seed mean of a_A,s - a_B,s for fitted asymptotes given as (value,
    standard error) per seed pair: seeds drawn with replacement, each asymptote drawn from the
    normal its fit gives. NaN bounds when a fit has no finite standard error."""
    ma, sa = np.array(fits_a, dtype=float).T
    mb, sb = np.array(fits_b, dtype=float).T
    mean = float(np.mean(ma - mb))
    if not (np.isfinite(sa).all() and np.isfinite(sb).all()):
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ma), size=(n_samples, len(ma)))
    diffs = (rng.normal(ma[idx], sa[idx]) - rng.normal(mb[idx], sb[idx])).mean(1)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)
