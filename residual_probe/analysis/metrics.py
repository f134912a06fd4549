"""Representation metrics: per-layer scalars (the plain form of what the probe's hooks
compute in `probe/quantities/token_stats.py`; studies and benchmarks call these) and pairwise
layer matrices.

Every function is a pure tensor function (no drawing, no I/O, no `.item()`): it returns a
tensor, computed in at least float32 (half and bfloat16 inputs are upcast, float64 stays
float64), on detached inputs. Norms in denominators are eps-guarded, so zero or constant
tokens give finite numbers (a zero vector has cosine 0 with anything), never NaN.

Conventions (docs/design.md, section 2 "What is measured"):
- per-layer functions take token-wise tensors of shape (..., d): every leading dim is a token,
  and they return a 0-d tensor averaged over tokens;
- pairwise functions take a stacked subsample H of shape (L, n, d): L layers, the same n tokens.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError

EPS = 1e-12  # guards norms; far below any real hidden-state norm, even in float32
LN_EPS = 1e-5  # LayerNorm eps of the reference models (torch.nn.LayerNorm's default)


class MetricError(UserError):
    """An input no metric can be computed from (wrong shape, too few tokens); one line for the user."""


def _up(x: torch.Tensor) -> torch.Tensor:
    """Detached, in float32 at least: half precision would overflow ||h||^2 and lose the cosine."""
    x = x.detach()
    return x if x.dtype == torch.float64 else x.float()


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (tokens, d), upcast; rejects scalars and empty inputs."""
    if x.dim() < 1 or x.numel() == 0:
        raise MetricError(
            f"expected a non-empty tensor of shape (..., d), got shape {tuple(x.shape)}"
        )
    return _up(x).reshape(-1, x.shape[-1])


def _pair(prev: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if prev.shape != cur.shape:
        raise MetricError(
            f"layer outputs differ in shape: {tuple(prev.shape)} vs {tuple(cur.shape)}"
        )
    a, b = _tokens(prev), _tokens(cur)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; a zero row stays zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


# ---- per layer: (prev, cur) of shape (..., d) -> 0-d tensor ---------------------------------


def token_cos(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Per-token cosine between two layers' outputs: (..., d) x2 -> (tokens,)."""
    a, b = _pair(prev, cur)
    return (_unit(a) * _unit(b)).sum(-1).clamp(-1.0, 1.0)


def cos_adjacent(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of cos(h_{k-1}, h_k): 1 means block k changed no token's direction."""
    return token_cos(prev, cur).mean()


def block_influence(cos: torch.Tensor | float) -> torch.Tensor:
    """ShortGPT's block influence (Men et al. 2024), 1 - cos_adjacent: 0 for a block that does nothing."""
    return 1.0 - torch.as_tensor(cos)


def angular_distance(cos: torch.Tensor | float) -> torch.Tensor:
    """arccos(cos) / pi in [0, 1] (Gromov et al. 2024); cos clamped to [-1, 1] first."""
    return torch.arccos(torch.as_tensor(cos).clamp(-1.0, 1.0)) / math.pi


def relative_update(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||h_k - h_{k-1}|| / ||h_{k-1}||, defined per token then averaged.

    Per token (not a ratio of RMS norms) so that it is the quantity of the ResiDual collapse
    analysis, where each token's stream is one vector; a zero h_{k-1} is guarded by EPS.
    """
    a, b = _pair(prev, cur)
    return ((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(EPS)).mean()


def norm_sq_per_dim(h: torch.Tensor) -> torch.Tensor:
    """E||h||^2 / d over tokens (Xiong et al. 2020, Lemma 2's quantity, divided by d)."""
    x = _tokens(h)
    return x.square().mean()  # mean over tokens and coordinates = E||h||^2 / d


def layer_norm(x: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm without affine over the last dim, in the input's (upcast) dtype."""
    x = _up(x)
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)


def ln_update(prev: torch.Tensor, cur: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """E|LN(h_k) - LN(h_{k-1})| per coordinate, mean over tokens and coordinates.

    The ResiDual paper's collapse quantity (Sec. 3): how much block k moves the normalized
    stream; LN has no affine and the reference models' eps (1e-5).
    """
    a, b = _pair(prev, cur)
    return (layer_norm(b, eps) - layer_norm(a, eps)).abs().mean()


# ---- pairwise: stacked subsample H of shape (L, n, d) -------------------------------------


def _stack(H: torch.Tensor) -> torch.Tensor:
    if H.dim() != 3 or H.numel() == 0:
        raise MetricError(
            f"expected stacked layer outputs of shape (L, n, d), got {tuple(H.shape)}"
        )
    return _up(H)


def similarity_matrix(H: torch.Tensor) -> torch.Tensor:
    """(L, n, d) -> (L, L): S[i, j] = mean over the n tokens of cos(h_i, h_j).

    One matmul: the sum of per-token dot products of unit vectors is the dot product of the
    flattened (n*d) unit-row matrices.
    """
    U = _unit(_stack(H))
    flat = U.reshape(U.shape[0], -1)
    return (flat @ flat.T / U.shape[1]).clamp(-1.0, 1.0)


def _centered_gram(X: torch.Tensor, debiased: bool) -> torch.Tensor:
    """(..., n, d) -> (..., n, n) centered linear Gram matrix.

    Biased: H K H with H the centering matrix (Kornblith et al. 2019, Eq. 3).
    Debiased: the U-statistic centering of Kornblith et al.'s reference code (diagonal zeroed,
    row means over n-2 removed), whose inner products give the unbiased HSIC of Song et al.
    2012 up to a factor n(n-3) that cancels in CKA.
    """
    X = X - X.mean(dim=-2, keepdim=True)
    K = X @ X.transpose(-1, -2)
    n = K.shape[-1]
    if not debiased:
        return K  # X is centered, so K is already H K H
    K = K - torch.diag_embed(torch.diagonal(K, dim1=-2, dim2=-1))
    means = K.sum(-1) / (n - 2)  # (..., n)
    means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
    K = K - means.unsqueeze(-1) - means.unsqueeze(-2)
    return K - torch.diag_embed(torch.diagonal(K, dim1=-2, dim2=-1))


def _check_cka_tokens(n: int, debiased: bool) -> None:
    need = 4 if debiased else 2
    if n < need:
        kind = "debiased" if debiased else "biased"
        raise MetricError(f"{kind} CKA needs at least {need} tokens, got {n}")


def _cka_from_grams(G: torch.Tensor) -> torch.Tensor:
    """(L, n, n) centered Grams -> (L, L) CKA; a layer with zero centered Gram gets CKA 0."""
    flat = G.reshape(G.shape[0], -1)
    hsic = flat @ flat.T
    diag = hsic.diagonal()
    # A constant layer has zero centered Gram; its CKA is undefined, reported as 0 (not NaN).
    # Debiased self-HSIC can be slightly negative in tiny samples; clamp before the sqrt.
    scale = diag.clamp_min(0).sqrt()
    return hsic / (scale[:, None] * scale[None, :]).clamp_min(EPS)


def cka_matrix(H: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """(L, n, d) -> (L, L) linear CKA between all layer pairs, from L centered Gram matrices.

    Cost: L Grams of n x n (n*n*d*L flops) and one (L, n*n) x (n*n, L) product; with n = 256
    this is cheaper than feature-space CKA for d >= n and stays fast for L = 48.
    """
    H = _stack(H)
    _check_cka_tokens(H.shape[1], debiased)
    return _cka_from_grams(_centered_gram(H, debiased))


def effective_rank(X: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli 2007: exp of the entropy of the normalized singular values of X.

    X: (..., d), leading dims are tokens (not centered: a shared mean direction counts, as in
    rank-collapse studies). Between 1 (rank 1) and min(n, d); an all-zero X gives 0.
    """
    s = torch.linalg.svdvals(_tokens(X))
    total = s.sum()
    p = s / total.clamp_min(EPS)
    entropy = -(p * torch.log(p.clamp_min(EPS))).sum()  # 0 * log(0) := 0
    return torch.where(total > EPS, torch.exp(entropy), torch.zeros_like(total))
