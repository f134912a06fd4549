"""The ResiDual paper's translation experiment at CPU scale: encoder-decoder across depth, placement and warm-up.

Entry point: the study lives in residual_probe/studies/translation.py.
Usage: python analyses/translation_study.py [--out figures] [--quick]
The full grid is resumable: rerun the same command after an interruption.
"""

from residual_probe.jobs.figures import script_main
from residual_probe.studies.translation import run

if __name__ == "__main__":
    script_main(run, __doc__)
