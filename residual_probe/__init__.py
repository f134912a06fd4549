"""residual-probe: diagnostics for residual connections and norm placement in Transformers."""

__version__ = "0.1.0"
