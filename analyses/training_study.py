"""Training study on CPU: post-ln / pre-ln / residual, with and without learning-rate warm-up.

Entry point: the study lives in residual_probe/studies/training_study.py.
Usage: python analyses/training_study.py [--out figures] [--quick]
"""

from residual_probe.studies import main

if __name__ == "__main__":
    main("training_study")
