"""Token-mean forward statistics of one block transition h_{k-1} -> h_k, one small unit each.

A unit returns its *per-token* values (a (tokens,) tensor) from a shared `Transition`;
`forward_stats` stacks the units' columns and sums over tokens in one reduction, and divides by
the token count at export, so the recorded value is the token mean over all forwards of the step.
A new token-mean statistic is one subclass here, added to TOKEN_STATS, plus its naive per-token
twin in tests/test_probe.py (`naive_stats`).

The lean pass: every unit reads per-token reductions that the Transition computes once, lazily
(the norms of a, b and b - a, which give cos and the angle, and the means), and ln_update forms LN(b) - LN(a) = rb b - ra a - (rb mb - ra ma)
in place in one (tokens, d) temporary, its per-token moments taken from the norms and means
already there (var = ||x||^2 / d - mean^2): seven passes over the activations and about twenty
small per-token ops, against two LayerNorms and four more temporaries before (0.7x the time at
256 x 256, 0.3-0.65x at 2048 x 1024, one CPU thread; benchmarks/overhead.py has the step ratios).
Inputs are upcast to float32 (float64 stays); the angle comes from the chord, not arccos(cos).

Definitions (docs/design.md, section 2 "What is measured"; a = h_{k-1}, b = h_k per token, d = width):
- cos_adjacent      cos(a, b)
- angular_distance  arccos(cos(a, b)) / pi, per token then averaged (Gromov et al. 2024), not
                    arccos of the mean cosine
- relative_update   ||b - a|| / ||a||
- norm_sq_per_dim   ||b||^2 / d (Xiong et al. 2020, Lemma 2, divided by d)
- ln_update         mean over coordinates of |LN(b) - LN(a)|, LN without affine, eps 1e-5
                    (the ResiDual paper's collapse quantity)
Norms in denominators are guarded by metrics.EPS.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch

from ...analysis.metrics import EPS, LN_EPS


class Transition:
    """One stream across one block: a = input, b = output, both (tokens, d), upcast once; the
    per-token reductions are computed on first use and shared by every unit."""

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
    def norm_diff(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.b - self.a, dim=-1)

    @cached_property
    def half_chord_sq(self) -> torch.Tensor:
        """sin^2(theta / 2) of the angle between a and b, from ||b - a||^2 = (|a| - |b|)^2 + 4 |a| |b| sin^2(theta / 2):
        exact, and unlike 1 - a.b / (|a| |b|) it keeps its digits for small angles in float32
        (theta = 1e-4: the dot product's rounding alone moves arccos by 40 %)."""
        na, nb = self.norm_a, self.norm_b
        s = (self.norm_diff.square() - (na - nb).square()) / (4 * na.clamp_min(EPS) * nb.clamp_min(EPS))
        return s.clamp(0.0, 1.0)

    @cached_property
    def cos(self) -> torch.Tensor:
        return 1.0 - 2.0 * self.half_chord_sq

    @cached_property
    def angle(self) -> torch.Tensor:
        return 2.0 * torch.asin(self.half_chord_sq.sqrt())

    @cached_property
    def ln_diff_abs_sum(self) -> torch.Tensor:
        """Per token: sum over coordinates of |LN(b) - LN(a)| (no affine, eps LN_EPS)."""
        d = self.d
        ma, mb = self.a.mean(-1), self.b.mean(-1)
        ra = ((self.norm_a.square() / d - ma.square()).clamp_min(0.0) + LN_EPS).rsqrt()
        rb = ((self.norm_b.square() / d - mb.square()).clamp_min(0.0) + LN_EPS).rsqrt()
        u = self.b * rb[:, None]
        u.addcmul_(self.a, ra[:, None], value=-1.0)
        u.sub_((rb * mb - ra * ma)[:, None])
        return u.abs_().sum(-1)


class TokenStat:
    """One per-token statistic of a Transition, as a (tokens,) tensor."""

    name = ""

    def __call__(self, t: Transition) -> torch.Tensor:
        raise NotImplementedError


class CosAdjacent(TokenStat):
    name = "cos_adjacent"

    def __call__(self, t):
        return t.cos


class AngularDistance(TokenStat):
    name = "angular_distance"

    def __call__(self, t):
        return t.angle / math.pi


class RelativeUpdate(TokenStat):
    name = "relative_update"

    def __call__(self, t):
        return t.norm_diff / t.norm_a.clamp_min(EPS)


class NormSqPerDim(TokenStat):
    name = "norm_sq_per_dim"

    def __call__(self, t):
        return t.norm_b.square() / t.d


class LnUpdate(TokenStat):
    name = "ln_update"

    def __call__(self, t):
        return t.ln_diff_abs_sum / t.d


TOKEN_STATS: tuple[TokenStat, ...] = (CosAdjacent(), RelativeUpdate(), NormSqPerDim(), LnUpdate(), AngularDistance())
