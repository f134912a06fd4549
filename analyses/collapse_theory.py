"""Representation collapse per layer: the ResiDual closed forms, Monte-Carlo, and real models.

Entry point: the study lives in residual_probe/studies/collapse_theory.py.
Usage: python analyses/collapse_theory.py [--out figures] [--quick]
"""

from residual_probe.studies import main

if __name__ == "__main__":
    main("collapse_theory")
