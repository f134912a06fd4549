"""Theory curves: what a healthy or a broken placement should look like, one function per statement.

Each function returns the predicted curve (numpy, float64) for the statement in DESIGN.md's
"Theory to check against measurement", with its source and assumptions in the docstring. Where
the statement fixes only a shape (a rate, a slope), the unknown constant is an argument: the
caller fits it to measurement (see `fits.py`) and checks the shape.

Index conventions: `layers` counts blocks applied (l = 1 is the first block's output); for
the collapse result `k` is 1-based as in the paper (x_1 is the stream entering block 1).
"""

from __future__ import annotations

import math

import numpy as np

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ---- Xiong et al. 2020, Lemma 2: hidden-state norms ----------------------------------------


def xiong_lemma2_preln_band(layers, v0: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pre-LN: (1 + l/2) <= E||x_l||^2 / d <= (1 + 3l/2), as (lower, upper) per dimension.

    Xiong et al. 2020, Lemma 2. Assumptions: x at the embedding has E||x||^2/d = v0 (the lemma
    has v0 = 1), each block = uniform self-attention + ReLU FFN with square Xavier-Gaussian
    weights, so a block adds between d/2 (FFN alone: ReLU halves the second moment) and 3d/2
    (attention adds at most d when tokens are identical). Linear growth in l.
    """
    l = _arr(layers)
    return v0 + 0.5 * l, v0 + 1.5 * l


def xiong_lemma2_postln(layers, before_ln: bool = False) -> np.ndarray:
    """Post-LN: flat in l. E||x||^2/d = 3/2 before the block's last LN (Lemma 2: x + FFN(x) with x
    normalized and the FFN adding d/2), and 1 on the block output (an LN without affine at init,
    up to its eps), whatever the depth.
    """
    return np.full(_arr(layers).shape, 1.5 if before_ln else 1.0)


# ---- Xiong et al. 2020, Theorem 1: last block's W2 gradient against depth -------------------

XIONG_W2_SLOPE = {"post-ln": 0.0, "pre-ln": -0.5}  # d log||dL/dW2|| / d log L


def xiong_w2_curve(depths, placement: str, scale: float = 1.0) -> np.ndarray:
    """||dL/dW2 of the last block||_F = scale * L^slope, slope 0 (Post-LN) or -1/2 (Pre-LN).

    Xiong et al. 2020, Theorem 1: O(d sqrt(ln d)) for Post-LN, independent of L, and
    O(d sqrt(ln d / L)) for Pre-LN, because the final LN divides by ||x_L|| ~ sqrt(L)
    (Lemma 2). Only the slope is predicted; `scale` (the O's constant) is fitted.
    """
    if placement not in XIONG_W2_SLOPE:
        raise ValueError(f"Theorem 1 covers post-ln and pre-ln, not {placement!r}")
    return scale * _arr(depths) ** XIONG_W2_SLOPE[placement]


# ---- ResiDual (Xie et al. 2023): gradients per layer -----------------------------------------


def postln_gradient_shape(distance) -> np.ndarray:
    """Post-LN path's gradient to a layer at `distance` m = N - k sublayers from the output,
    relative to m = 0: (1/2)^(m/2) * e^sqrt(m) (the ResiDual paper's reported shape).

    Asymptotically a geometric decay of 2^(-1/2) ~ 0.707 per sublayer: each LN of a sum x + F(x)
    whose two terms have equal variance halves the squared gradient; e^sqrt(m) is the
    sub-exponential correction from the sublayers' Jacobians. Counted in sublayers (a block
    has 2, or 3 with cross-attention).
    """
    m = _arr(distance)
    return 0.5 ** (m / 2) * np.exp(np.sqrt(m))


def postln_gradient_rate_per_block(sublayers_per_block: int) -> float:
    """Asymptotic per-block factor of `postln_gradient_shape`: 2^(-s/2) for s sublayers."""
    return 2.0 ** (-sublayers_per_block / 2)


def residual_gradient_floor(layers, scale: float = 1.0) -> np.ndarray:
    """ResiDual's dual-path lower bound: flat in k.

    The d stream is d_{k+1} = d_k + b_k with b_k = F(x_k), so dL/dd_k = dL/dd_N exactly, for every
    k: the dual path delivers the same output gradient to every block, as Pre-LN's residual does,
    and block k's gradient holds the term (db_k/dtheta_k)^T dL/dd_N that does not decay with
    N - k (Xie et al. 2023, Sec. 4). `scale` (the size of that term) is fitted; the shape
    claim is "no exponential decay", i.e. a per-block rate near 1.
    """
    return np.full(_arr(layers).shape, float(scale))


# ---- ResiDual: representation collapse under independent Gaussian updates -------------------


def collapse_stream_variance(placement: str, k, sigma2: float = 1.0, v1: float = 1.0) -> np.ndarray:
    """Per-coordinate variance v_k of the stream entering block k (1-based) in the toy model.

    Assumptions (Xie et al. 2023, Sec. 4): x_1 ~ N(0, v1 I), updates f_k ~ N(0, sigma2 I)
    independent of everything. Pre-LN: x_{k+1} = x_k + f_k, so v_k = v1 + (k-1) sigma2.
    Post-LN and ResiDual's x stream: x_{k+1} = LN(x_k + f_k), so v_k = 1 for k >= 2 (v_1 = v1).
    """
    k = _arr(k)
    if placement == "pre-ln":
        return v1 + (k - 1) * sigma2
    if placement in ("post-ln", "residual"):
        return np.where(k <= 1, v1, 1.0)
    raise ValueError(f"the collapse result covers pre-ln, post-ln and residual, not {placement!r}")


def collapse_prediction(placement: str, k, sigma2: float = 1.0, v1: float = 1.0) -> dict[str, np.ndarray]:
    """Exact large-d closed forms for block k's (1-based) effect on the stream, in the toy model.

    With a = sqrt(v_k) and b = sqrt(v_k + sigma2) (d -> infinity, so ||x||^2/d -> its mean and
    LN(x) -> x / sqrt(var)):
    - cos_adjacent = cos(x_k, x_k + f_k) = a / b = sqrt(v_k / (v_k + sigma2)).
      Pre-LN with v1 = sigma2: sqrt(k / (k + 1)) -> 1. Post-LN / ResiDual x: 1/sqrt(1 + sigma2).
    - ln_update = E|LN(x_{k+1}) - LN(x_k)| per coordinate. Each coordinate of
      (x + f)/b - x/a is Gaussian with variance (1 - a/b)^2 + sigma2/b^2 = 2(1 - cos), so
      ln_update = sqrt(2/pi) * sqrt(2(1 - cos)). Pre-LN: ~ sqrt(2/(pi k)) = O(1/sqrt(k)).
    - relative_update = ||x_{k+1} - x_k|| / ||x_k||: Pre-LN sqrt(sigma2 / v_k) = O(1/sqrt(k));
      Post-LN / ResiDual x (both on the LN sphere) sqrt(2(1 - cos)) for k >= 2.
    Finite d adds O(1/d) corrections (LN's sample mean and variance).
    """
    v = collapse_stream_variance(placement, k, sigma2, v1)
    cos = np.sqrt(v / (v + sigma2))
    ln_update = SQRT_2_OVER_PI * np.sqrt(2.0 * (1.0 - cos))
    if placement == "pre-ln":
        rel = np.sqrt(sigma2 / v)
    else:  # x_{k+1} = LN(x_k + f_k); for k = 1, x_1 is not on the sphere: ||LN(x+f) - x|| / ||x||
        kk = _arr(k)
        rel_sphere = np.sqrt(2.0 * (1.0 - cos))
        rel_first = np.sqrt(1.0 + 1.0 / v - 2.0 * cos / np.sqrt(v))
        rel = np.where(kk <= 1, rel_first, rel_sphere)
    return {"cos_adjacent": cos, "ln_update": ln_update, "relative_update": rel}


def simulate_collapse(placement: str, n_blocks: int, d: int, tokens: int, sigma2: float = 1.0,
                      v1: float = 1.0, seed: int = 0):
    """Monte-Carlo of the toy model: the stream x_1..x_{n_blocks+1}, shape (n_blocks + 1, tokens, d).

    Same assumptions as `collapse_prediction` (LN without affine, eps 1e-5), in float64.
    """
    import torch

    from .metrics import layer_norm

    if placement not in ("pre-ln", "post-ln", "residual"):
        raise ValueError(f"the collapse result covers pre-ln, post-ln and residual, not {placement!r}")
    g = torch.Generator().manual_seed(seed)
    x = math.sqrt(v1) * torch.randn(tokens, d, generator=g, dtype=torch.float64)
    states = [x]
    for _ in range(n_blocks):
        f = math.sqrt(sigma2) * torch.randn(tokens, d, generator=g, dtype=torch.float64)
        x = x + f if placement == "pre-ln" else layer_norm(x + f)
        states.append(x)
    return torch.stack(states)


# ---- ResiDual: Adam at vanishing gradients ---------------------------------------------------


def adam_step_ratio(g_healthy, g_small, eps: float = 1e-8) -> np.ndarray:
    """Ratio of Adam's effective step size lr/(sqrt(v_hat)+eps) between a coordinate whose gradient
    has RMS `g_small` and one with RMS `g_healthy`: (g_healthy + eps) / (g_small + eps).

    This is the condition number of Adam's preconditioner diag(1/(sqrt(v_hat)+eps)) over a
    model where some layers' gradients vanish. At g_small = 0 it is 1 + g_healthy/eps; the
    ResiDual paper's "about alpha sqrt(d) / eps" is this with g_healthy = alpha sqrt(d) (a
    healthy coordinate's gradient scale written as alpha sqrt(d)). Exact for Adam's first
    step (v_hat = g^2) and for stationary gradients once v_hat has converged to E[g^2].
    """
    return (_arr(g_healthy) + eps) / (_arr(g_small) + eps)


def residual_adam_condition(alpha, d, eps: float = 1e-8) -> np.ndarray:
    """The paper's approximation alpha * sqrt(d) / eps of `adam_step_ratio` at g_small = 0."""
    return _arr(alpha) * np.sqrt(_arr(d)) / eps
