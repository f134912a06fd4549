"""Token-mean forward statistics of one block transition h_{k-1} -> h_k, one small unit each.

Two stages. First, seven numbers per token of each transition (`RAW`), written by one of two
functions with the same output. `chain_columns` takes consecutive residual states h_j, ..., h_{j+n}
(each block's output is the next block's input) stacked as (n + 1, tokens, d): seven kernels
for all n blocks together. `raw_columns` takes one block's input and output where they are, with
the input's LayerNorm carried over from the previous block (`Moments`). Then a `Transition` over
the raw rows gives each unit's per-token values, and `forward_stats` sums them over tokens
(dividing by the token count at export, so the recorded value is the token mean over all
forwards of the step). A new token-mean statistic is one `TokenStat` subclass here, added to
TOKEN_STATS, plus its naive per-token twin in tests/test_probe.py (`naive_stats`); if it needs a
new per-token reduction of the activations, that is one more RAW column (in both functions).

Why two: inside a training step a hook pays per kernel launch far more than per byte when the
states are small (each kernel's code and data were evicted by the surrounding matmuls: ~25 us a
kernel in situ against ~5 us warm, at 256 tokens x 256 dims), so small states are copied while
hot and batched over blocks (`chain_columns`); when states are large the bytes dominate, and the
copy and the recomputed LayerNorm of each batch's first state would cost more than the launches
saved (`raw_columns`, in place). Either way one LayerNorm kernel per state yields LN with its
mean and 1/sqrt(var + eps), from which the norms follow (||x||^2 = d (var + mean^2));
sum |LN(b) - LN(a)| and ||b - a|| are the only other reductions; cos and the angle come from the
three norms (the chord), so no dot product is taken. States are upcast to float32 (float64
stays); the chord keeps small angles' digits where arccos(cos) loses them.

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
import weakref
from functools import cached_property

import torch

from ...analysis.metrics import EPS, LN_EPS


class Moments:
    """LN(x) without affine, with the per-token mean and 1/sqrt(var + eps), of one (tokens, d)
    stream in the statistics' dtype: one LayerNorm kernel. A block's output moments are the next
    block's input moments; `matches` tells whether they may be reused for a given input."""

    def __init__(self, source: torch.Tensor, flat: torch.Tensor):
        """`flat`: `source` as (tokens, d) in the statistics' dtype."""
        self.source = weakref.ref(
            source
        )  # the tensor these moments were taken from (not kept alive)
        self.version = source._version  # in-place writes since then invalidate them
        self.ln, self.mean, self.rstd = torch.native_layer_norm(
            flat, flat.shape[-1:], None, None, LN_EPS
        )

    def matches(self, x: torch.Tensor) -> bool:
        return self.source() is x and x._version == self.version

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ln, self.mean, self.rstd))


# Per-token raw columns, in this order: a token weight (1; 0 in padding), sum |LN(b) - LN(a)|,
# ||b - a||, mean of a and of b, 1/sqrt(var + eps) of a and of b.
RAW = ("tokens", "ln_diff_abs_sum", "norm_diff", "mean_a", "mean_b", "rstd_a", "rstd_b")
PADDING = (0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0)  # a row that is no token: weight 0, finite statistics


def raw_columns(
    prev: torch.Tensor,
    cur: torch.Tensor,
    out: torch.Tensor,
    ones: torch.Tensor,
    prev_moments: Moments | None = None,
) -> Moments:
    """Write the RAW columns of the transition prev -> cur into `out` (tokens, len(RAW)), with
    `ones` a (tokens, 1) column of ones; return cur's moments for the next block. Six
    kernels over the activations (seven when `prev_moments` do not match `prev`) and one copy."""
    d, dtype = cur.shape[-1], stats_dtype(prev, cur)  # the caller runs under no_grad
    a, b = (x.reshape(-1, d) for x in (prev, cur))
    a, b = (
        x if x.dtype == dtype else x.to(dtype) for x in (a, b)
    )  # no dispatch when already there
    ma = (
        prev_moments
        if prev_moments is not None and prev_moments.matches(prev)
        else Moments(prev, a)
    )
    mb = Moments(cur, b)
    # LN(a) is dead after this block (the caller carries LN(b) on): the difference is taken in its place.
    # |.|.sum, not vector_norm(ord=1): 7x slower on the CPU.
    ln_diff = ma.ln.sub_(mb.ln).abs_().sum(-1, keepdim=True)
    norm_diff = torch.linalg.vector_norm(b - a, 2, -1, keepdim=True)
    torch.cat((ones, ln_diff, norm_diff, ma.mean, mb.mean, ma.rstd, mb.rstd), 1, out=out)
    return mb


def chain_columns(states: torch.Tensor) -> torch.Tensor:
    """The RAW columns (n, tokens, len(RAW)) of the n transitions states[i] -> states[i + 1] of
    `states` (n + 1, tokens, d), in the statistics' dtype. Seven kernels, whatever n."""
    d = states.shape[-1]
    ln, mean, rstd = torch.native_layer_norm(states, (d,), None, None, LN_EPS)
    # |.|.sum, not vector_norm(ord=1): 7x slower on the CPU.
    ln_diff = torch.sub(ln[1:], ln[:-1]).abs_().sum(-1)
    del ln
    norm_diff = torch.linalg.vector_norm(states[1:] - states[:-1], 2, -1)
    mean, rstd = mean.squeeze(-1), rstd.squeeze(-1)
    return torch.stack(
        (torch.ones_like(ln_diff), ln_diff, norm_diff, mean[:-1], mean[1:], rstd[:-1], rstd[1:]), -1
    )


class Transition:
    """Per-token quantities of transitions from their RAW columns (..., len(RAW)), any leading
    shape (a pending (slots, tokens) buffer, or one block's tokens), d the width. The units read
    these; cos and the angle share `half_chord_sq`."""

    def __init__(self, raw: torch.Tensor, d: int):
        self.d = d
        self.weight, self.ln_diff_abs_sum, self.norm_diff = raw[..., 0], raw[..., 1], raw[..., 2]
        # ||x||^2 = d (var + mean^2), var = rstd^-2 - eps: last axis a, b
        self.norm_sq = (
            (raw[..., 5:7].pow(-2).sub_(LN_EPS) + raw[..., 3:5].square()).mul_(d).clamp_min_(0.0)
        )
        self.norm_a, self.norm_b = self.norm_sq.sqrt().unbind(-1)

    @classmethod
    def of(cls, prev: torch.Tensor, cur: torch.Tensor) -> "Transition":
        """The transition of one block, in one go (tests, one-off use)."""
        d, dtype = cur.shape[-1], stats_dtype(prev, cur)
        states = torch.stack([x.detach().reshape(-1, d).to(dtype) for x in (prev, cur)])
        return cls(chain_columns(states)[0], d)

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


def stats_dtype(prev: torch.Tensor, cur: torch.Tensor) -> torch.dtype:
    """The statistics' dtype: float64 if either stream is float64, else float32 (half and bfloat16 upcast)."""
    return torch.float64 if torch.float64 in (prev.dtype, cur.dtype) else torch.float32


class TokenStat:
    """One per-token statistic of a Transition, a tensor of its leading shape."""

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
        return t.norm_sq[..., 1] / t.d


class LnUpdate(TokenStat):
    name = "ln_update"

    def __call__(self, t):
        return t.ln_diff_abs_sum / t.d


TOKEN_STATS: tuple[TokenStat, ...] = (
    CosAdjacent(),
    RelativeUpdate(),
    NormSqPerDim(),
    LnUpdate(),
    AngularDistance(),
)
