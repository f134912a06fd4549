"""Instability study on CPU: attention-logit growth over a learning-rate sweep, QK-norm, and the lead time of the precursor warnings.

Entry point: the study lives in residual_probe/studies/instability.py.
Usage: python analyses/instability.py [--out figures] [--quick]
"""

from residual_probe.studies import main

if __name__ == "__main__":
    main("instability")
