"""Metrics against naive loop references, known cases and degenerate inputs."""

import math

import numpy as np
import pytest
import torch

from residual_probe.analysis import metrics as M


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- naive references (loops over tokens / pairs, float64 numpy) ----------------------------


def naive_cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def naive_hsic_unbiased(K, L):
    """Song et al. 2012, Eq. 5, written out with zero-diagonal Grams."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (
        np.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ K @ L @ one
    ) / (n * (n - 3))


def naive_cka(X, Y, debiased):
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    if debiased:
        K, L = X @ X.T, Y @ Y.T
        return naive_hsic_unbiased(K, L) / math.sqrt(
            naive_hsic_unbiased(K, K) * naive_hsic_unbiased(L, L)
        )
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


# ---- per-layer metrics -----------------------------------------------------------------------


def test_per_layer_metrics_match_loops():
    g = _gen(1)
    prev = torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    cur = prev + 0.5 * torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    P, C = prev.reshape(-1, 16).numpy(), cur.reshape(-1, 16).numpy()
    cos = np.mean([naive_cos(p, c) for p, c in zip(P, C)])
    rel = np.mean([np.linalg.norm(c - p) / np.linalg.norm(p) for p, c in zip(P, C)])
    ln = lambda v: (v - v.mean()) / math.sqrt(v.var() + 1e-5)  # noqa: E731
    lnu = np.mean([np.abs(ln(c) - ln(p)).mean() for p, c in zip(P, C)])
    assert M.cos_adjacent(prev, cur).item() == pytest.approx(cos, rel=1e-12)
    assert M.relative_update(prev, cur).item() == pytest.approx(rel, rel=1e-12)
    assert M.ln_update(prev, cur).item() == pytest.approx(lnu, rel=1e-10)
    assert M.norm_sq_per_dim(cur).item() == pytest.approx(
        np.mean([c @ c / 16 for c in C]), rel=1e-12
    )
    assert M.block_influence(M.cos_adjacent(prev, cur)).item() == pytest.approx(1 - cos, rel=1e-10)
    assert M.angular_distance(0.0).item() == pytest.approx(0.5)
    assert M.angular_distance(1.0 + 1e-7).item() == 0.0  # rounding above 1 is clamped, not NaN


def test_per_layer_known_values():
    x = torch.randn(5, 8, generator=_gen(2))
    assert M.cos_adjacent(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert M.cos_adjacent(x, -x).item() == pytest.approx(-1.0, abs=1e-6)
    assert M.relative_update(x, 2 * x).item() == pytest.approx(1.0, rel=1e-6)
    assert M.ln_update(x, 3 * x + 1).item() == pytest.approx(
        0.0, abs=1e-5
    )  # LN removes scale/shift
    assert M.norm_sq_per_dim(torch.full((4, 9), 2.0)).item() == pytest.approx(4.0)


def test_degenerate_tokens_are_finite():
    z, c = torch.zeros(4, 8), torch.ones(4, 8)
    for v in (
        M.cos_adjacent(z, c),
        M.relative_update(z, c),
        M.ln_update(z, c),
        M.relative_update(z, z),
        M.ln_update(c, c),
        M.norm_sq_per_dim(z),
    ):
        assert torch.isfinite(v)
    assert M.cos_adjacent(z, c).item() == 0.0
    assert M.ln_update(c, 2 * c).item() == 0.0  # constant tokens normalize to 0, not NaN


def test_half_precision_is_upcast():
    x = torch.randn(64, 32, generator=_gen(3)) * 300  # ||x||^2 ~ 3e6 overflows float16 (max 65504)
    y = x + torch.randn(64, 32, generator=_gen(4)) * 30
    assert M.norm_sq_per_dim(x.half()).dtype == torch.float32
    assert M.norm_sq_per_dim(x.half()).item() == pytest.approx(
        M.norm_sq_per_dim(x).item(), rel=1e-3
    )
    assert M.cos_adjacent(x.half(), y.half()).item() == pytest.approx(
        M.cos_adjacent(x, y).item(), abs=1e-3
    )
    assert M.cos_adjacent(x.bfloat16(), y.bfloat16()).isfinite()


def test_shape_mismatch_is_a_metric_error():
    with pytest.raises(M.MetricError, match="differ in shape"):
        M.cos_adjacent(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(M.MetricError):
        M.norm_sq_per_dim(torch.zeros(0, 4))


# ---- pairwise ----------------------------------------------------------------------------------


def test_similarity_matrix_matches_loops():
    H = torch.randn(4, 6, 5, generator=_gen(5), dtype=torch.float64)
    H[2] = H[1] + 0.1 * H[0]
    S = M.similarity_matrix(H)
    for i in range(4):
        for j in range(4):
            ref = np.mean([naive_cos(H[i, t].numpy(), H[j, t].numpy()) for t in range(6)])
            assert S[i, j].item() == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matches_naive(debiased):
    g = _gen(6)
    X = torch.randn(20, 7, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(7, 11, generator=g, dtype=torch.float64) + torch.randn(
        20, 11, generator=g, dtype=torch.float64
    )
    H = torch.stack([X[:, :5], Y[:, :5], X[:, :5] * 3 + 1])
    C = M.cka_matrix(H, debiased)
    assert C[0, 1].item() == pytest.approx(
        naive_cka(X[:, :5].numpy(), Y[:, :5].numpy(), debiased), rel=1e-10
    )
    assert C[0, 2].item() == pytest.approx(1.0, abs=1e-12)  # CKA is invariant to scale and shift
    assert torch.allclose(C, C.T)


def cka(X, Y, debiased=False) -> float:
    return M.cka_matrix(torch.stack([X, Y]), debiased)[0, 1].item()


def test_cka_known_cases():
    # identical layers -> 1; centered features orthogonal -> 0 (biased), debiased near 0
    g = _gen(7)
    Q, _ = torch.linalg.qr(torch.randn(32, 33, generator=g, dtype=torch.float64))
    Q = Q - Q.mean(0)
    Q, _ = torch.linalg.qr(Q[:, :8])  # 8 orthonormal columns orthogonal to the all-ones vector
    X, Y = Q[:, :4], Q[:, 4:]
    assert cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert cka(X, Y) == pytest.approx(0.0, abs=1e-12)
    assert cka(X, X, debiased=True) == pytest.approx(1.0, abs=1e-12)
    # biased CKA of independent random features is inflated at small n; debiased is near 0
    A, B = torch.randn(2, 40, 200, generator=g)
    assert cka(A, B) > 0.5
    assert abs(cka(A, B, debiased=True)) < 0.05


def test_cka_degenerate_inputs():
    const = torch.ones(10, 4)
    assert cka(const, torch.randn(10, 4, generator=_gen(8))) == 0.0
    H = torch.stack([const, torch.randn(10, 4, generator=_gen(9))]).half()
    assert torch.isfinite(M.cka_matrix(H, debiased=True)).all()
    with pytest.raises(M.MetricError, match="at least 4 tokens"):
        M.cka_matrix(torch.randn(2, 3, 4), debiased=True)


def test_effective_rank_known_cases():
    g = _gen(10)
    u, v = torch.randn(30, generator=g), torch.randn(16, generator=g)
    assert M.effective_rank(torch.outer(u, v)).item() == pytest.approx(1.0, abs=1e-4)
    assert M.effective_rank(torch.eye(16)).item() == pytest.approx(16.0, rel=1e-6)
    # two equal singular values and one of twice the size: exp(H(1/4, 1/4, 1/2))
    D = torch.diag(torch.tensor([2.0, 1.0, 1.0]))
    assert M.effective_rank(D).item() == pytest.approx(math.exp(1.5 * math.log(2)), rel=1e-6)
    assert M.effective_rank(torch.zeros(5, 3)).item() == 0.0
