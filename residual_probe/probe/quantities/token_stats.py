"""Token-mean forward statistics of one block transition h_{k-1} -> h_k, one small unit each.

A unit returns its *per-token* values (a (tokens,) tensor) from a shared `Transition`;
`forward_stats` stacks the units' columns and sums over tokens in one reduction, and divides by
the token count at export, so the recorded value is the token mean over all forwards of the step.
A new token-mean statistic is one subclass here, added to TOKEN_STATS, plus its naive per-token
twin in tests/test_probe.py (`naive_stats`).

The lean pass: six kernels over the activations per stream, everything else per token. One
LayerNorm kernel for each of a and b yields LN(x) with its mean and 1/sqrt(var + eps); the
norms follow from those moments (||x||^2 = d (var + mean^2)), ln_update sums |LN(b) - LN(a)|
in place, and ||b - a|| is the only other reduction; cos and the angle come from the three
norms (the chord), so no dot product is taken. Before: eleven kernels over the activations and
twice as many small ones. Kernels over the activations are what a forward hook pays for: each
one reads a block output that the surrounding matmuls have evicted from the cache, and wakes
the intra-op threads (benchmarks/overhead.py has the step ratios). Inputs are upcast to
float32 (float64 stays); the chord keeps small angles' digits where arccos(cos) loses them.

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
    """One stream across one block: a = input, b = output, both (tokens, d).

    Computed at once, in few kernels (a hook pays per kernel launch as much as per byte): the
    per-token norms of a, b (from the LayerNorm moments) and b - a, and sum |LN(b) - LN(a)|.
    The units read columns of these; cos and the angle share `half_chord_sq`."""

    def __init__(self, prev: torch.Tensor, cur: torch.Tensor):
        d = cur.shape[-1]
        a, b = prev.reshape(-1, d), cur.reshape(-1, d)  # the caller runs under no_grad
        dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
        if a.dtype != dtype:
            a = a.to(dtype)
        if b.dtype != dtype:
            b = b.to(dtype)
        self.d = d
        la, ma, ra = torch.native_layer_norm(a, (d,), None, None, LN_EPS)
        lb, mb, rb = torch.native_layer_norm(b, (d,), None, None, LN_EPS)
        self.ln_diff_abs_sum = lb.sub_(la).abs_().sum(-1)  # per token, sum over coordinates of |LN(b) - LN(a)|
        # ||x||^2 = d (var + mean^2), var = rstd^-2 - eps: columns a, b
        self.norm_sq = (torch.cat((ra, rb), 1).pow_(-2).sub_(LN_EPS) + torch.cat((ma, mb), 1).square_()).mul_(d)
        self.norm_sq.clamp_min_(0.0)
        self.norm_a, self.norm_b = self.norm_sq.sqrt().unbind(1)
        self.norm_diff = torch.linalg.vector_norm(b - a, dim=-1)

    @cached_property
    def half_chord_sq(self) -> torch.Tensor:
        """sin^2(theta / 2) of the angle between a and b, from ||b - a||^2 = (|a| - |b|)^2 + 4 |a| |b| sin^2(theta / 2):
        exact, and unlike 1 - a.b / (|a| |b|) it keeps its digits for small angles in float32
        (theta = 1e-4: the dot product's rounding alone moves arccos by 40 %)."""
        na, nb = self.norm_a, self.norm_b
        s = (self.norm_diff.square() - (na - nb).square_()) / (4 * na * nb).clamp_min_(EPS)
        return s.clamp_(0.0, 1.0)

    @cached_property
    def cos(self) -> torch.Tensor:
        return 1.0 - 2.0 * self.half_chord_sq

    @cached_property
    def angle(self) -> torch.Tensor:
        return self.half_chord_sq.sqrt().asin_().mul_(2.0)


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
        return t.norm_sq[:, 1] / t.d


class LnUpdate(TokenStat):
    name = "ln_update"

    def __call__(self, t):
        return t.ln_diff_abs_sum / t.d


TOKEN_STATS: tuple[TokenStat, ...] = (CosAdjacent(), RelativeUpdate(), NormSqPerDim(), LnUpdate(), AngularDistance())
