"""Every registered placement side by side: gradients at initialization (depths 6-48) and a short training run without warm-up.

Entry point: the study lives in residual_probe/studies/all_placements.py.
Usage: python analyses/all_placements.py [--out figures] [--quick]
"""

from residual_probe.studies import main

if __name__ == "__main__":
    main("all_placements")
