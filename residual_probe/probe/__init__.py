"""The probe: hooks that record per-layer gradient and representation statistics of any Transformer.

from residual_probe.probe import Probe
with Probe(model) as probe:
    ...; loss.backward(); probe.step()
rows = probe.rows()
"""

from .discovery import BlockInfo, DiscoveryError, clean_path, find_blocks
from .errors import ProbeError
from .gradnorm import GroupNorms, SquaredNorms, grouped_norms, squared_norms
from .params import PARAM_GROUPS, W2_NAMES, ParamPlan
from .probe import Probe
from .quantities import DEFAULT_QUANTITIES, QUANTITIES, REGISTRY, TOKEN_STATS, Quantity, TokenStat
from .records import COLUMNS, RowSink
from .schedule import Schedule

__all__ = [
    "BlockInfo",
    "COLUMNS",
    "DEFAULT_QUANTITIES",
    "DiscoveryError",
    "GroupNorms",
    "PARAM_GROUPS",
    "ParamPlan",
    "Probe",
    "ProbeError",
    "QUANTITIES",
    "Quantity",
    "REGISTRY",
    "RowSink",
    "Schedule",
    "SquaredNorms",
    "TOKEN_STATS",
    "TokenStat",
    "W2_NAMES",
    "clean_path",
    "find_blocks",
    "grouped_norms",
    "squared_norms",
]
