"""Token-mean forward statistics of one block transition h_{k-1} -> h_k, one small unit each.

A unit returns the *sum over tokens* of its per-token value from a shared `Transition`, whose
intermediates (token norms, the difference, the two LayerNorms) are computed once, lazily, for
all units: the single fused pass over each block's output. `forward_stats` divides by the
token count at export, so the recorded value is the token mean over all forwards of the step.
A new token-mean statistic is one subclass here, added to TOKEN_STATS, plus its naive per-token
twin in tests/test_probe_quantities.py.

Definitions (DESIGN.md, "What is measured"; a = h_{k-1}, b = h_k per token, d = width):
- cos_adjacent      cos(a, b)
- angular_distance  arccos(cos(a, b)) / pi, per token then averaged (Gromov et al. 2024), not
                    arccos of the mean cosine
- relative_update   ||b - a|| / ||a||
- norm_sq_per_dim   ||b||^2 / d (Xiong et al. 2020, Lemma 2, divided by d)
- ln_update         mean over coordinates of |LN(b) - LN(a)|, LN without affine, eps 1e-5
                    (the ResiDual paper's collapse quantity)
Norms in denominators are guarded by metrics.EPS; inputs are upcast to float32 (float64 stays).
"""

from __future__ import annotations

import math
from functools import cached_property

import torch

from ...analysis.metrics import EPS, LN_EPS, layer_norm


class Transition:
    """One stream across one block: a = input, b = output, both (tokens, d), upcast once."""

    def __init__(self, prev: torch.Tensor, cur: torch.Tensor):
        d = cur.shape[-1]
        a, b = prev.detach().reshape(-1, d), cur.detach().reshape(-1, d)
        dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
        self.a, self.b = a.to(dtype), b.to(dtype)
        self.d, self.tokens = d, a.shape[0]

    @cached_property
    def norm_a(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.a, dim=-1)

    @cached_property
    def norm_b(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.b, dim=-1)

    @cached_property
    def cos(self) -> torch.Tensor:
        dot = (self.a * self.b).sum(-1)
        return (dot / (self.norm_a.clamp_min(EPS) * self.norm_b.clamp_min(EPS))).clamp(-1.0, 1.0)


class TokenStat:
    """Sum over tokens of one per-token statistic."""

    name = ""

    def __call__(self, t: Transition) -> torch.Tensor:
        raise NotImplementedError


class CosAdjacent(TokenStat):
    name = "cos_adjacent"

    def __call__(self, t):
        return t.cos.sum()


class AngularDistance(TokenStat):
    name = "angular_distance"

    def __call__(self, t):
        return torch.arccos(t.cos).sum() / math.pi


class RelativeUpdate(TokenStat):
    name = "relative_update"

    def __call__(self, t):
        return (torch.linalg.vector_norm(t.b - t.a, dim=-1) / t.norm_a.clamp_min(EPS)).sum()


class NormSqPerDim(TokenStat):
    name = "norm_sq_per_dim"

    def __call__(self, t):
        return t.norm_b.square().sum() / t.d


class LnUpdate(TokenStat):
    name = "ln_update"

    def __call__(self, t):
        return (layer_norm(t.b, LN_EPS) - layer_norm(t.a, LN_EPS)).abs().sum() / t.d


TOKEN_STATS: tuple[TokenStat, ...] = (CosAdjacent(), RelativeUpdate(), NormSqPerDim(), LnUpdate(), AngularDistance())
