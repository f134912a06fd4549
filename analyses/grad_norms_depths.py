"""Per-layer gradient norms at initialization, post-ln / pre-ln / residual, depths 6 to 48.

Entry point: the study lives in residual_probe/studies/grad_norms_depths.py.
Usage: python analyses/grad_norms_depths.py [--out figures] [--quick]
"""

from residual_probe.studies import main

if __name__ == "__main__":
    main("grad_norms_depths")
