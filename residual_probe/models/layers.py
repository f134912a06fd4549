"""Building blocks of the reference Transformers, fairseq-style (what the ResiDual paper trained).

A `Sublayer` is one residual branch F (self-attention, cross-attention or FFN) together with
the norms its placement puts around it: `norm` (the one LN most placements use, before or
after F) and `out_norm` (Sandwich/Peri-LN's second LN on F's output). Where the norms sit in
the formula is the placement's business (placements.py), not the sublayer's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * g, no centring, no bias."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DynamicTanh(nn.Module):
    """DyT (Zhu et al. 2025): gamma * tanh(alpha * x) + beta, a norm without statistics; alpha is one
    learnable scalar, `alpha0` at init (0.5, the paper's default outside LLMs). As the reference
    (jiachenzhu/DyT, dynamic_tanh.py, channels-last case). `bias=False`: gamma * tanh(alpha * x),
    the LLaMA recipe's `LayerNormParameterized` (other_tasks/LLaMA/fms_fsdp/models/llama.py)."""

    def __init__(self, d: int, alpha0: float = 0.5, bias: bool = True):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), alpha0))
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.alpha * x) * self.weight
        return y if self.bias is None else y + self.bias


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dimension: nGPT's `justnorm` (F.normalize's eps only guards zero)."""
    return F.normalize(x, dim=-1)


class StoredScale(nn.Module):
    """A learned vector stored as nGPT stores its scalings (Loshchilov et al. 2024, Sec. 2.5; NVIDIA/ngpt
    model.py): the parameter starts at `scaling` and the model uses `value()` = parameter * (init /
    scaling) * factor, `init` * factor at the start. Adam moves the parameter by about lr per step
    whatever its size, so `scaling` sets how fast the used value moves (the paper's "eigen learning
    rates"). Read with `value()`, not called: it transforms no input."""

    def __init__(self, shape: tuple[int, ...], init: float, scaling: float, factor: float = 1.0):
        super().__init__()
        self.stored = nn.Parameter(torch.full(shape, float(scaling)))
        self.multiplier = init / scaling * factor

    def value(self) -> torch.Tensor:
        return self.stored * self.multiplier


class ScaledUnitNorm(nn.Module):
    """unit(x) * s over the last dimension, s a `StoredScale` broadcast against x: nGPT's q and k
    normalization, s_qk of shape (heads, 1, head_dim) for q, k of shape (B, heads, T, head_dim)."""

    def __init__(self, scale: StoredScale):
        super().__init__()
        self.s = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unit(x) * self.s.value()


class ScaledLinear(nn.Linear):
    """A bias-free linear map whose outputs are multiplied per output unit by a `StoredScale`:
    nGPT's logits s_z * (W h)."""

    def __init__(self, d_in: int, d_out: int, scale: StoredScale):
        super().__init__(d_in, d_out, bias=False)
        self.sz = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.sz.value()


def make_norm(kind: str, d: int, eps: float = 1e-5) -> nn.Module:
    """A norm of `kind`: layernorm, rmsnorm, dyt or dyt-nobias (the DyTs have no eps)."""
    if kind in ("dyt", "dyt-nobias"):
        return DynamicTanh(d, bias=kind == "dyt")
    return nn.LayerNorm(d, eps=eps) if kind == "layernorm" else RMSNorm(d, eps=eps)


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """A doubly stochastic matrix from (.., n, n) logits by Sinkhorn-Knopp: exp, then columns and
    rows scaled to sum 1 in turn (lucidrains/hyper-connections `sinkhorn_knopps`, 20 iterations;
    the column max is subtracted first, which cancels in the first column scaling)."""
    m = (logits - logits.amax(dim=-2, keepdim=True).detach()).exp()
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


class HyperConnection(nn.Module):
    """The width and depth connections around one sublayer of a hyper-connection stack: from the n
    stream copies h (.., n, C) the branch input sum_j pre_j h_j, the branch output's weights `post`
    (n) and the residual mixing `comb` (n, n), applied as h'_k = sum_j comb[j, k] h_j + post_k F.

    Returns (post, comb, collapsed) as transformers' `DeepseekV4HyperConnection` does, and names
    n `hc_mult` as it does: a module with an integer `hc_mult` is what the probe reads as a
    hyper-connection. Parameters as lucidrains/hyper-connections (`hyper_connections.py`,
    `manifold_constrained_hyper_connections.py`): static alpha = [e_(index mod n) | I] and beta =
    1, plus dynamic terms from the per-stream RMS-normed h (weights zero at init; one scale for the
    pre and one for the residual terms, 0.01, as the mHC code has them and the HC code's one).
    Hyper-Connections (Zhu et al. 2024): pre, comb and post are the sums as they are, the dynamic
    terms through tanh. mHC (`constrained`, Xie et al. 2026): pre = sigmoid, post = 2 sigmoid,
    comb = Sinkhorn-Knopp of exp(alpha_res), doubly stochastic; no tanh."""

    def __init__(self, d: int, n: int, index: int, constrained: bool, dynamic: bool = True):
        super().__init__()
        self.hc_mult, self.constrained, self.dynamic = n, constrained, dynamic
        alpha = torch.zeros(n, 1 + n)
        alpha[index % n, 0] = 1.0
        alpha[:, 1:] = torch.eye(n)
        self.static_alpha = nn.Parameter(alpha)  # column 0: pre; columns 1..n: comb
        self.static_beta = nn.Parameter(torch.ones(n))  # post
        if dynamic:
            self.norm = RMSNorm(d)
            self.dynamic_alpha_fn = nn.Parameter(torch.zeros(d, 1 + n))
            self.dynamic_beta_fn = nn.Parameter(torch.zeros(d))
            self.dynamic_alpha_scale = nn.Parameter(torch.full((2,), 1e-2))  # pre, residual
            self.dynamic_beta_scale = nn.Parameter(torch.full((), 1e-2))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha, beta = self.static_alpha, self.static_beta  # (n, 1 + n), (n)
        if self.dynamic:
            normed = self.norm(h)  # (.., n, C)
            act = (lambda t: t) if self.constrained else torch.tanh
            n = self.hc_mult
            scale = torch.cat(
                [self.dynamic_alpha_scale[:1], self.dynamic_alpha_scale[1:].expand(n)]
            )
            alpha = alpha + act(normed @ self.dynamic_alpha_fn) * scale
            beta = beta + act(normed @ self.dynamic_beta_fn) * self.dynamic_beta_scale
        pre, comb = alpha[..., 0], alpha[..., 1:]
        if self.constrained:
            pre, comb, beta = torch.sigmoid(pre), sinkhorn(comb), 2 * torch.sigmoid(beta)
        pre, comb = pre.expand(*h.shape[:-1]), comb.expand(*h.shape[:-1], h.shape[-2])
        collapsed = (pre.unsqueeze(-1) * h).sum(dim=-2)
        return beta.expand(*h.shape[:-1]), comb, collapsed


class Sublayer(nn.Module):
    """A residual branch F with its placement's norms; calling it returns dropout(F(h))."""

    def __init__(self, norms: int, norm_kind: str, d: int, dropout: float):
        super().__init__()
        self.norm = make_norm(norm_kind, d) if norms >= 1 else None
        self.out_norm = make_norm(norm_kind, d) if norms >= 2 else None
        self.dropout = nn.Dropout(dropout)

    def branch(self, h: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, h: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        # The dropped-out output is what every stream receives (ResiDual feeds it to both).
        return self.dropout(self.branch(h, memory))


class Attention(Sublayer):
    """Multi-head attention with fairseq's q/k/v/out projections; cross-attention reads memory.

    `dropout` acts on the sublayer's output, `attention_dropout` on the attention weights
    (fairseq's two rates). `qk_norm`: a norm of the config's kind on q and on k of each head, over
    head_dim (QK-layernorm: Wortsman et al. 2023, arXiv 2309.14322; Dehghani et al. 2023; OLMo 2
    and Qwen 3 use it against attention-logit growth). `v_norm`: one on v too (HybridNorm's
    QKV-norm, Zhuo et al. 2025).

    `observer`: None, or a callable called as observer(q, k, causal) with the tensors SDPA
    receives, q (B, heads, T, head_dim) and k (B, heads, S, head_dim) after the projections and
    QK-norm, scaled by `scale` (SDPA's 1/sqrt(head_dim) when None) and masked only by `causal` (SDPA's
    is_causal: query i sees keys 0..i). The probe's attn_logits quantity sets it; unset, it costs
    one attribute test.

    `scale`: the factor on q k^T, None for SDPA's 1/sqrt(head_dim) (nGPT sets sqrt(head_dim)).
    `bias`: whether the four projections have biases (nGPT's have none).
    """

    observer = None  # a class default: models saved before it existed load unchanged
    scale: float | None = None  # likewise

    def __init__(
        self,
        d: int,
        heads: int,
        dropout: float,
        causal: bool,
        norms: int,
        norm_kind: str,
        attention_dropout: float = 0.0,
        qk_norm: bool = False,
        v_norm: bool = False,
        bias: bool = True,
    ):
        super().__init__(norms, norm_kind, d, dropout)
        self.heads, self.causal, self.attn_dropout = heads, causal, attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(d, d, bias=bias) for _ in range(4)
        )
        self.q_norm = make_norm(norm_kind, d // heads) if qk_norm else None
        self.k_norm = make_norm(norm_kind, d // heads) if qk_norm else None
        self.v_norm = make_norm(norm_kind, d // heads) if v_norm else None  # HybridNorm's QKV-norm

    def branch(self, h: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        B, T, C = h.shape
        src = h if memory is None else memory  # (B, S, C)

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, S, C) -> (B, heads, S, C/heads)
            return t.view(B, -1, self.heads, C // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(h)), split(self.k_proj(src)), split(self.v_proj(src))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v_norm = getattr(self, "v_norm", None)  # absent from models pickled before it existed
        if v_norm is not None:
            v = v_norm(v)
        causal = self.causal and memory is None
        if self.observer is not None:
            self.observer(q, k, causal)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=causal,
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=self.scale,
        )
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(Sublayer):
    """fc2(dropout_act(relu(fc1(h)))): fairseq's FFN; fc2.weight is Xiong et al.'s W2.

    `dropout` acts on the sublayer's output, `activation_dropout` after the ReLU (fairseq).
    `hidden_scale`: None, or a `StoredScale` over the hidden units that multiplies fc1's output
    before the ReLU (nGPT's s_u). `bias`: whether fc1 and fc2 have biases (nGPT's have none).
    """

    def __init__(
        self,
        d: int,
        ffn: int,
        dropout: float,
        norms: int,
        norm_kind: str,
        activation_dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__(norms, norm_kind, d, dropout)
        self.fc1, self.fc2 = nn.Linear(d, ffn, bias=bias), nn.Linear(ffn, d, bias=bias)
        self.act_dropout = nn.Dropout(activation_dropout)
        self.hidden_scale: StoredScale | None = None

    def branch(self, h: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        z = self.fc1(h)
        hidden_scale = getattr(self, "hidden_scale", None)  # absent from models pickled before it
        if hidden_scale is not None:
            z = z * hidden_scale.value()
        return self.fc2(self.act_dropout(F.relu(z)))


def sinusoidal_positions(n: int, d: int, offset: int = 0) -> torch.Tensor:
    """fairseq's sinusoidal table, (n, d): sin in the first half of the channels, cos in the second."""
    half = d // 2
    freq = torch.exp(
        torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / max(half - 1, 1))
    )
    angle = torch.arange(offset, offset + n, dtype=torch.float64)[:, None] * freq[None, :]
    table = torch.cat([angle.sin(), angle.cos()], dim=1)
    if d % 2:
        table = torch.cat([table, torch.zeros(n, 1, dtype=torch.float64)], dim=1)
    return table


class Embedding(nn.Module):
    """Token embedding scaled by sqrt(d) plus fixed sinusoidal positions, then dropout (fairseq)."""

    def __init__(self, vocab: int, d: int, max_len: int, dropout: float, position_offset: int = 0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.scale = math.sqrt(d)
        positions = sinusoidal_positions(max_len, d, position_offset).float()
        self.register_buffer("positions", positions, persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        T = tokens.shape[1]
        if T > self.positions.shape[0]:
            raise ValueError(f"sequence length {T} exceeds max_len {self.positions.shape[0]}")
        x = self.scale * self.embed_tokens(tokens)
        return self.dropout(x + self.positions[:T].to(x.dtype))
