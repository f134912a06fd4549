"""Theory curves: what a healthy or a broken placement should look like, one function per statement.

Each function returns the predicted curve (numpy, float64) for a statement of docs/design.md,
section 3 "Theory checked against measurement", with its source and assumptions in the docstring. Where
the statement fixes only a shape (a rate, a slope), the unknown constant is an argument: the
caller fits it to measurement (see `fits.py`) and checks the shape.

Index conventions: `layers` counts blocks applied (l = 1 is the first block's output); for
the collapse result `k` is 1-based as in the paper (x_1 is the stream entering block 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ---- Xiong et al. 2020, Lemma 2: hidden-state norms ----------------------------------------
#
# What one sublayer adds to E||x||^2/d, at initialization and in expectation over the weights,
# when its input has ||x||^2 = d (an LN output without affine). Exact for the stated inits
# (the cross term <x, F(x)> vanishes in expectation because the last weight matrix is
# zero-mean); Monte-Carlo tested in tests/test_theory.py.


def ffn_gain(d: int, ffn: int, init: str) -> float:
    """E||FFN(x)||^2 / d for ||x||^2 = d, FFN = fc2(relu(fc1(x))) at initialization.

    - "xiong": Xavier weights (variance 2/(fan_in + fan_out)), zero biases:
      2 * ffn * d / (d + ffn)^2, i.e. 1/2 for the lemma's square FFN (ReLU halves the second
      moment) and 0.32 for ffn = 4d.
    - "fairseq": PyTorch's nn.Linear default for both layers (weights and biases uniform with
      variance 1/(3 fan_in)): (d + 1) / (18 d) + 1 / (3 ffn), about 0.057 at d 128, ffn 512.
    """
    if init == "xiong":
        return 2.0 * ffn * d / (d + ffn) ** 2
    if init == "fairseq":
        return (d + 1) / (18.0 * d) + 1.0 / (3.0 * ffn)
    raise ValueError(f"init: unknown {init!r}")


def attention_gain_range(d: int, init: str) -> tuple[float, float]:
    """(lowest, highest) E||Attn(x)||^2 / d for LN-output tokens (||x_j||^2 = d), any attention weights.

    The attention output is c W_v W_o (+ biases) with c = sum_j a_j x_j a convex combination, so
    0 <= ||c||^2 <= d: 0 when the attended tokens cancel, d when they are identical.
    - "xiong": W_v, W_o Xavier (variance 1/d), zero biases: ||c||^2/d in [0, 1].
    - "fairseq": W_v Xavier with gain 1/sqrt(2) (variance 1/(2d)), v bias PyTorch default
      (variance 1/(3d)), W_o Xavier, zero out bias: ||c||^2/(2d) + 1/(3d), in [1/(3d), 1/2 + 1/(3d)].
    """
    if init == "xiong":
        return 0.0, 1.0
    if init == "fairseq":
        return 1.0 / (3 * d), 0.5 + 1.0 / (3 * d)
    raise ValueError(f"init: unknown {init!r}")


def preln_norm_band(
    layers, v0: float, d: int, ffn: int, init: str
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-LN: (lower, upper) of E||x_l||^2 / d after l blocks of self-attention + FFN, at init.

    Each block adds its sublayers' gains (the stream's own part is carried unchanged and the
    cross terms vanish in expectation): v0 + l * (ffn_gain + attention low) ... v0 + l *
    (ffn_gain + attention high). In Xiong et al.'s setting (init "xiong", ffn = d) this is
    their Lemma 2, (1 + l/2) ... (1 + 3l/2) with v0 = 1; other widths and inits change the
    constants, not the linear form.
    """
    ell = _arr(layers)
    g = ffn_gain(d, ffn, init)
    lo, hi = attention_gain_range(d, init)
    return v0 + ell * (g + lo), v0 + ell * (g + hi)


def xiong_lemma2_preln_band(layers, v0: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pre-LN: (1 + l/2) <= E||x_l||^2 / d <= (1 + 3l/2), as (lower, upper) per dimension.

    Xiong et al. 2020, Lemma 2, in its own setting: square FFN (d x d weights, entries of
    variance 1/d), W^Q = W^K = 0 (uniform attention), E||x_0||^2/d = v0 (1 in the lemma).
    `preln_norm_band(l, v0, d, d, "xiong")` up to its O(1/d) terms; other sizes: use that.
    """
    ell = _arr(layers)
    return v0 + 0.5 * ell, v0 + 1.5 * ell


def postln_final_ln_input(d: int, ffn: int, init: str) -> float:
    """Post-LN: E||x + FFN(x)||^2 / d at the input of a block's last LN (the FFN's), at init.

    Xiong et al. 2020, Lemma 2 (Post-LN): 3/2 (i.e. 3d/2), at every depth, in its setting
    (square FFN, variance-1/d weights): the FFN's input x is an LN output (||x||^2 = d) and the
    FFN adds d/2. In general 1 + ffn_gain(d, ffn, init). Not a statement about block outputs:
    those are LN outputs, E||h||^2/d = 1 by construction.
    """
    return 1.0 + ffn_gain(d, ffn, init)


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

    Each LN of a sum x + F(x) whose two terms have equal variance halves the squared gradient;
    e^sqrt(m) is the sub-exponential correction from the sublayers' Jacobians. Counted in
    sublayers (a block has 2, or 3 with cross-attention). Over a finite stack the e^sqrt(m)
    factor matters: see `postln_curve_rate`.
    """
    m = _arr(distance)
    return 0.5 ** (m / 2) * np.exp(np.sqrt(m))


def postln_gradient_curve(n_blocks: int, sublayers_per_block: int) -> np.ndarray:
    """The paper's curve over blocks k = 0..n_blocks-1, m = s (n_blocks - 1 - k), last block = 1."""
    k = np.arange(n_blocks)
    return postln_gradient_shape(sublayers_per_block * (n_blocks - 1 - k))


def postln_curve_rate(n_blocks: int, sublayers_per_block: int) -> float:
    """Per-block factor of a geometric fit (least squares in log) to `postln_gradient_curve` over the
    same blocks: the number to compare with a measured geometric rate, e.g. 0.434 at N 48, s 3
    and 0.592 at s 2, not the asymptote 2^(-s/2) (0.354, 0.5) that e^sqrt(m) only reaches at
    thousands of sublayers."""
    k = np.arange(n_blocks, dtype=np.float64)
    slope = np.polyfit(k, np.log(postln_gradient_curve(n_blocks, sublayers_per_block)), 1)[0]
    return float(np.exp(-slope))


def postln_gradient_rate_per_block(sublayers_per_block: int) -> float:
    """Asymptotic per-block factor of `postln_gradient_shape` (m -> infinity): 2^(-s/2)."""
    return 2.0 ** (-sublayers_per_block / 2)


def residual_gradient_floor(layers, scale: float = 1.0) -> np.ndarray:
    """An identity path's lower bound (ResiDual's dual stream, Pre-LN's residual): flat in k.

    The d stream is d_{k+1} = d_k + s*b_k, so dL/dd_k = dL/dd_N for every k: the dual path
    delivers the same output gradient to every block, as Pre-LN's residual does, and block k's
    gradient holds the term (db_k/dtheta_k)^T dL/dd_N that does not decay with N - k
    (Xie et al. 2023, Sec. 4). `scale` (the size of that term) is fitted; the claim is a bound,
    "no exponential decay", i.e. a per-block rate near 1, not that the profile is flat.
    """
    return np.full(_arr(layers).shape, float(scale))


@dataclass(frozen=True)
class GradientProfile:
    """What a source predicts for a placement's per-block gradient norms at initialization."""

    kind: str  # "decay": the curve itself; "floor": a lower bound drawn as a flat line
    source: str

    def curve(self, layers, sublayers_per_block: int, last: float) -> np.ndarray:
        """The prediction over `layers` (block indices), through the last block's measured norm."""
        k = _arr(layers)
        if self.kind == "decay":
            return last * postln_gradient_shape(sublayers_per_block * (k[-1] - k))
        return residual_gradient_floor(k, last)


GRADIENT_PROFILES = {
    "decay": GradientProfile(
        "decay", "Xie et al. 2023 (ResiDual), Sec. 4: Post-LN gradient ~ (1/2)^(m/2) e^sqrt(m)"
    ),
    "floor": GradientProfile(
        "floor",
        "Xie et al. 2023 (ResiDual), Sec. 4: an identity path to the output bounds the gradient below",
    ),
}


def gradient_profile(placement: str) -> GradientProfile | None:
    """The predicted gradient profile of a registered placement (its `gradient_profile`), or None
    where no source states one (DeepNorm, B2T, Sandwich, ...: no curve is drawn for them)."""
    from ..models.placements import PLACEMENTS

    cls = PLACEMENTS.get(placement)
    name = getattr(cls, "gradient_profile", None) if cls else None
    return GRADIENT_PROFILES.get(name) if name else None


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


def collapse_prediction(
    placement: str, k, sigma2: float = 1.0, v1: float = 1.0
) -> dict[str, np.ndarray]:
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


def simulate_collapse(
    placement: str,
    n_blocks: int,
    d: int,
    tokens: int,
    sigma2: float = 1.0,
    v1: float = 1.0,
    seed: int = 0,
):
    """Monte-Carlo of the toy model: the stream x_1..x_{n_blocks+1}, shape (n_blocks + 1, tokens, d).

    Same assumptions as `collapse_prediction` (LN without affine, eps 1e-5), in float64.
    """
    import torch

    from .metrics import layer_norm

    if placement not in ("pre-ln", "post-ln", "residual"):
        raise ValueError(
            f"the collapse result covers pre-ln, post-ln and residual, not {placement!r}"
        )
    g = torch.Generator().manual_seed(seed)
    x = math.sqrt(v1) * torch.randn(tokens, d, generator=g, dtype=torch.float64)
    states = [x]
    for _ in range(n_blocks):
        f = math.sqrt(sigma2) * torch.randn(tokens, d, generator=g, dtype=torch.float64)
        x = x + f if placement == "pre-ln" else layer_norm(x + f)
        states.append(x)
    return torch.stack(states)


def collapse_from_relative_update(relative_update) -> dict[str, np.ndarray]:
    """The toy model's closed forms for a stream whose block k adds an update of relative size
    r_k = ||f_k|| / ||x_k|| independent of x_k: cos_adjacent = 1/sqrt(1 + r^2) and
    ln_update = sqrt(2/pi) sqrt(2 (1 - cos)) (`collapse_prediction` with sigma2/v_k = r^2).

    Applied to a real model's measured r_k this gives the closed form's prediction *for that
    model's* variances: the toy model's O(1/sqrt(k)) needs r_k^2 = sigma2 / (v1 + (k-1) sigma2),
    i.e. v1 small against k sigma2 and sigma2 constant; with a large embedding variance v1 or
    a sigma2 that changes with k the slope over a finite stack is shallower than -1/2.
    """
    r = _arr(relative_update)
    cos = 1.0 / np.sqrt(1.0 + r**2)
    return {"cos_adjacent": cos, "ln_update": SQRT_2_OVER_PI * np.sqrt(2.0 * (1.0 - cos))}


def loglog_slope_of(k, values) -> float:
    """Least-squares slope of log values against log k (a curve's slope over given blocks)."""
    return float(np.polyfit(np.log(_arr(k)), np.log(_arr(values)), 1)[0])


# ---- ResiDual: Adam at vanishing gradients ---------------------------------------------------
#
# Adam's update of a parameter vector with gradient g, once v_hat has settled (or at the first
# step, where m_hat = g and v_hat = g^2): u_i = alpha * g_i / (|g_i| + eps), alpha the learning
# rate. Write g = sigma * z with z of unit RMS (sigma the gradient's RMS per coordinate). The
# update's (absolute) condition number is the sensitivity of its size to the gradient's scale,
# kappa = d||u|| / d sigma. Healthy gradients (sigma >> eps): u ~ alpha sign(g), kappa ~ 0, the
# update ignores the gradient's scale. Vanished gradients (sigma << eps): u ~ alpha g / eps and
# kappa -> alpha sqrt(d) / eps for d coordinates: a gradient change of delta per coordinate moves
# the update by alpha sqrt(d) delta / eps (the ResiDual paper's example: d 1024, eps 1e-6,
# alpha 1e-4 gives 3200), so Adam turns the noise of a vanished layer into full-size steps.


def residual_adam_condition(alpha, d, eps) -> np.ndarray:
    """The ResiDual paper's kappa ~ alpha sqrt(d) / eps at g -> 0; alpha is Adam's learning rate."""
    return _arr(alpha) * np.sqrt(_arr(d)) / _arr(eps)


def adam_update(g, alpha: float, eps: float) -> np.ndarray:
    """Adam's first update (bias-corrected m_hat = g, v_hat = g^2): alpha * g / (|g| + eps)."""
    g = _arr(g)
    return alpha * g / (np.abs(g) + eps)


def adam_update_condition(g, alpha: float, eps: float) -> float:
    """kappa = d||u(s g)|| / d(s * rms(g)) at s = 1, exactly, for u = `adam_update`.

    d u_i / d s = alpha g_i eps / (|g_i| + eps)^2, so kappa = (u . du/ds) / (||u|| rms(g)).
    Tends to `residual_adam_condition(alpha, len(g), eps)` as rms(g) / eps -> 0.
    """
    g = _arr(g).ravel()
    u = adam_update(g, alpha, eps)
    du = alpha * g * eps / (np.abs(g) + eps) ** 2
    rms = float(np.sqrt(np.mean(g**2)))
    return float(u @ du / (np.linalg.norm(u) * rms))


def adam_condition_curve(
    alpha: float, eps: float, n: int = 20000, seed: int = 0, grid=None
) -> tuple[np.ndarray, np.ndarray]:
    """kappa / (alpha sqrt(n) / eps) for a block of n standard Gaussian gradients scaled to RMS r * eps,
    over r in `grid` (default: 60 points from 1e-4 to 1e4): the closed form beside which a
    model's measured kappa is drawn."""
    grid = np.logspace(-4, 4, 60) if grid is None else grid
    z = np.random.default_rng(seed).standard_normal(n)
    ratio = np.array(
        [
            adam_update_condition(r * eps * z, alpha, eps) / residual_adam_condition(alpha, n, eps)
            for r in grid
        ]
    )
    return np.asarray(grid), ratio
