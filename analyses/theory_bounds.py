"""The papers' theory statements against the reference models at initialization.

Entry point: the study lives in residual_probe/studies/theory_bounds.py.
Usage: python analyses/theory_bounds.py [--out figures] [--quick]
"""

from residual_probe.studies import main

if __name__ == "__main__":
    main("theory_bounds")
