"""Time the pairwise layer matrices on a probe-sized subsample: 48 blocks + embedding, 256 tokens.

Prints the median wall time of similarity_matrix and cka_matrix (biased and debiased) for a few
widths, and each as a ratio to one (256 x d) @ (d x 256) Gram product per layer (the work any
CKA must do), so the numbers travel between machines. Target: well under a second each.
Run: .venv/bin/python benchmarks/pairwise_speed.py
"""

from __future__ import annotations

import statistics
import time

import torch

from residual_probe.analysis.metrics import cka_matrix, similarity_matrix

LAYERS, TOKENS, REPEATS = 49, 256, 7


def median_seconds(fn, *args) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, H = ({LAYERS}, {TOKENS}, d), float32"
    )
    print(
        f"{'d':>6} {'similarity':>12} {'cka':>10} {'cka debiased':>13} {'grams only':>11}   ratios to grams"
    )
    for d in (256, 512, 1024):
        H = torch.randn(LAYERS, TOKENS, d)
        grams = median_seconds(lambda h: h @ h.transpose(-1, -2), H)
        sim = median_seconds(similarity_matrix, H)
        cka = median_seconds(cka_matrix, H)
        dcka = median_seconds(lambda h: cka_matrix(h, debiased=True), H)
        print(
            f"{d:>6} {sim * 1e3:>10.1f}ms {cka * 1e3:>8.1f}ms {dcka * 1e3:>11.1f}ms {grams * 1e3:>9.1f}ms"
            f"   {sim / grams:.2f} / {cka / grams:.2f} / {dcka / grams:.2f}"
        )


if __name__ == "__main__":
    main()
