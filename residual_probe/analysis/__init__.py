"""The science, run on exported records (never inside hooks); one module per concern:

- metrics.py   per-layer metrics of hidden states (cosines, CKA, effective rank, ...), each with a
               naive twin in the tests
- theory.py    the papers' predicted curves, one function per statement
- fits.py      rates, slopes and fitted constants with their uncertainty (scipy)
- checks.py    each theory statement against a measurement: predicted, measured, agreement
- curves.py    seed bands (geometric mean, min..max), the first/last block ratio, EMA: the curves
               the figures draw
- verdicts.py  every verdict once: thresholds, decision and sentence (gradients vanish,
               collapse), the stream names they use
- gradients.py the `--theory` overlay (predicted and fitted per-block gradient curves)
- collapse.py  per-stream collapse summaries, massive activations, the k^-1/2 reference
- rows.py      tidy rows grouped into per-block profiles
- amplification.py  output change under a parameter perturbation (Liu et al. 2020)

Plots never compute: what they draw comes from here as numpy arrays or pandas DataFrames.
"""
