"""The probe: hooks that record per-layer gradient and representation statistics of any Transformer.

    from residual_probe.probe import Probe
    with Probe(model) as probe:
        ...; loss.backward(); probe.step()
    rows = probe.rows()
"""

from .discovery import BlockInfo, DiscoveryError, find_blocks
from .gradnorm import GroupNorms, grouped_norms, squared_norms
from .probe import Probe
from .records import COLUMNS, RowSink
from .schedule import QUANTITIES, ProbeError, Schedule

__all__ = ["BlockInfo", "COLUMNS", "DiscoveryError", "GroupNorms", "Probe", "ProbeError", "QUANTITIES",
           "RowSink", "Schedule", "find_blocks", "grouped_norms", "squared_norms"]
