"""`python -m residual_probe.cli`: the same as the `residual-probe` command."""

from . import main

main()
