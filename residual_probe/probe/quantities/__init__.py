"""The probe's quantities, one small class each over `base.Quantity`; REGISTRY maps name -> class.

Adding a quantity: a module here with one Quantity subclass, an entry in REGISTRY, a naive twin
in the tests. A new token-mean forward statistic is smaller still: one `token_stats.TokenStat`.
"""

from .act_grad_norm import ActGradNorm
from .attn_logits import AttnLogits
from .base import Quantity
from .forward_stats import ForwardStats
from .hc_mixing import HCMixing
from .output_logits import OutputLogits
from .param_grad_norm import ParamGradNorm
from .param_tensor_norm import ParamTensorNorm
from .subsample import Subsample
from .token_stats import TOKEN_STATS, TokenStat, Transition
from .update_ratio import UpdateRatio
from .w2_grad_norm import W2GradNorm

REGISTRY: dict[str, type[Quantity]] = {
    q.name: q
    for q in (
        ParamGradNorm,
        ActGradNorm,
        W2GradNorm,
        ForwardStats,
        Subsample,
        UpdateRatio,
        ParamTensorNorm,
        AttnLogits,
        OutputLogits,
        HCMixing,
    )
}
QUANTITIES = tuple(REGISTRY)  # every name a Probe accepts
DEFAULT_QUANTITIES = tuple(
    name for name, q in REGISTRY.items() if q.default
)  # a Probe without `quantities=`

__all__ = [
    "DEFAULT_QUANTITIES",
    "QUANTITIES",
    "REGISTRY",
    "TOKEN_STATS",
    "ActGradNorm",
    "AttnLogits",
    "ForwardStats",
    "HCMixing",
    "OutputLogits",
    "ParamGradNorm",
    "ParamTensorNorm",
    "Quantity",
    "Subsample",
    "TokenStat",
    "Transition",
    "UpdateRatio",
    "W2GradNorm",
]
