"""The science: metrics computed from probe records, theory curves, and fits."""
