"""The science, run on exported records (never inside hooks); one module per concern:

- metrics.py      representation metrics of hidden states (cosines, CKA, effective rank, ...), the
                  plain twins of what the probe's hooks compute; each with a naive twin in the tests
- theory.py       the papers' predicted curves, one function per statement
- fits.py         rates, slopes and fitted constants with their uncertainty (scipy)
- checks.py       each theory statement against a measurement: predicted, measured, agreement
- bounds.py       the statements `bounds` checks, from the reference models' rows at initialization
- curves.py       seed bands (geometric mean, min..max), the first/last block ratio, EMA: the
                  curves the figures draw
- verdicts.py     every verdict once: thresholds, decision and sentence (gradients vanish,
                  collapse), the stream names they use
- diagnosis.py    one checkpoint's gradient profile in numbers and plain language
- gradients.py    the `--theory` overlay (predicted and fitted per-block gradient curves)
- collapse.py     per-stream collapse summaries, massive activations, the k^-1/2 reference
- rows.py         tidy rows grouped into per-block profiles
- instability.py  where a run went wrong: gradient excursions, the block that started them
- precursors.py   warnings before a run breaks (attention logits, entropy, log Z drift)
- regime.py       the rules that choose a study's regime from its baselines
- significance.py one system better than another beyond sentence and seed noise

Plots never compute: what they draw comes from here as numpy arrays or pandas DataFrames.
"""
