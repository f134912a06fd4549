"""Norm placements: how a block combines its sublayers with the residual stream.

Each placement is one small class whose `sublayer` (or `block`) method *is* its formula from
docs/design.md ("Norm placements", with the sources), with its stack-level start/end and its own initialization beside it. Adding a
placement means adding a class here with `@register`; the model classes never change.

Notation in the methods: `x` the stream state (a tensor; ResiDual's is the pair (x, d)),
`f` the sublayer call returning dropout(F(h)), `s` the sublayer module holding the norms
(`s.norm`, `s.out_norm`), `blk` the block (its index `blk.k`, 0-based, and its parameters).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import nn

from .layers import ScaledLinear, ScaledUnitNorm, StoredScale, unit


class PlacementConfig(Protocol):
    """What a placement reads from the model's config (`ModelConfig` has these): named here, not
    imported, because the config validates its `placement` against PLACEMENTS."""

    arch: str
    placement: str
    d_model: int
    heads: int
    ffn: int
    vocab_size: int
    max_len: int
    alpha: float
    mix_ratio: float
    res_input_norm_scale: float
    share_all_embeddings: bool
    hc_streams: int
    hc_dynamic: bool

    def stack_depth(self, role: str) -> int: ...


PLACEMENTS: dict[str, type["Placement"]] = {}


def register(cls: type["Placement"]) -> type["Placement"]:
    PLACEMENTS[cls.name] = cls
    return cls


class Placement:
    """Base: a Post-LN-shaped stack with no stack-level norms. Subclasses override the formula."""

    name = ""
    sublayer_norms = 1  # LayerNorms each sublayer owns: 0 (ReZero), 1, or 2 (Sandwich)
    final_norm = False  # an LN at the end of the stack
    final_norm_eps = 1e-5
    embed_norm = False  # an LN on the embedding output (Peri-LN)
    streams: tuple[str, ...] = ("x",)  # names of the residual streams a block outputs
    stacked = False  # the streams are one tensor (.., n, C), not a tuple (hyper-connections)
    # What a source predicts for the per-block gradient norms at init (analysis/theory.py
    # GRADIENT_PROFILES): "decay" (ResiDual's Post-LN curve), "floor" (an identity path's lower
    # bound), or None where no source states one.
    gradient_profile: str | None = None
    # The streams that follow the Pre-LN toy model (an identity path, one LN at the end of the
    # stack): the k^-1/2 collapse reference is drawn for them (Xie et al. 2023, Sec. 4).
    pre_ln_streams: tuple[str, ...] = ()
    in_paper = False  # one of the ResiDual paper's compared placements (Xie et al. 2023, Table 1)
    norm: str | None = None  # the norm every norm of the model is (DyT); None: the config's `norm`
    qkv_norm = (
        False  # attention normalizes q, k and v per head (HybridNorm), whatever `qk_norm` says
    )
    linear_bias = True  # the attention's and FFN's linear maps have biases (nGPT's have none)
    init_schemes: tuple[str, ...] | None = None  # the model inits it can start from; None: all

    def sublayer_norm_count(self, kind: str, k: int) -> int:
        """Norms the sublayer of `kind` ("attn" or "ffn") in block k owns: `sublayer_norms` unless a
        placement leaves some out (HybridNorm's attention has none)."""
        return self.sublayer_norms

    def __init__(self, cfg: PlacementConfig, role: str):
        self.cfg, self.role = cfg, role  # role: "encoder" or "decoder"
        self.depth = cfg.stack_depth(role)

    def begin(self, x0: torch.Tensor, stack: nn.Module):
        """Stream state from the embedding output x0."""
        return stack.embed_norm(x0) if self.embed_norm else x0

    def sublayer(self, x, f: Callable, s: nn.Module, blk: nn.Module):
        raise NotImplementedError

    def block(self, x, subs: list[tuple[Callable, nn.Module]], blk: nn.Module):
        """One block: its sublayers (self-attn, [cross-attn,] FFN) in turn."""
        for f, s in subs:
            x = self.sublayer(x, f, s, blk)
        return x

    def end(self, x, stack: nn.Module) -> torch.Tensor:
        """The stack's output from the last block's state."""
        return stack.final_norm(x) if self.final_norm else x

    def add_parameters(self, blk: nn.Module) -> None:
        """Create placement-owned parameters on a block (ReZero's gate)."""

    def output_head(self, d: int, vocab: int) -> nn.Linear:
        """The output projection, when this stack feeds it (nGPT's scales its logits)."""
        return nn.Linear(d, vocab, bias=False)

    @torch.no_grad()
    def init_(self, stack: nn.Module) -> None:
        """Placement-specific initialization, applied after the model's own."""

    @torch.no_grad()
    def init_model_(self, stack: nn.Module, model: nn.Module) -> None:
        """Initialization that needs the whole model (a forward through it, or the output
        projection), run after every stack's `init_`, encoder first (Admin's profiling)."""

    @torch.no_grad()
    def after_step(self, stack: nn.Module, model: nn.Module) -> None:
        """Called by `Trainer` after every optimizer step (nGPT puts its weights back on the
        unit sphere)."""


@register
class PostLN(Placement):
    """x <- LN(x + F(x))  (Vaswani et al. 2017)."""

    name = "post-ln"
    gradient_profile = "decay"  # Xie et al. 2023, Sec. 4
    in_paper = True

    def sublayer(self, x, f, s, blk):
        return s.norm(x + f(x))


@register
class PreLN(Placement):
    """x <- x + F(LN(x)); LN(x) at the end of the stack (Xiong et al. 2020)."""

    name = "pre-ln"
    final_norm = True
    gradient_profile = "floor"  # the identity path: Xiong et al. 2020; Xie et al. 2023, Sec. 4
    pre_ln_streams = ("x",)
    in_paper = True

    def sublayer(self, x, f, s, blk):
        return x + f(s.norm(x))


@register
class ResiDual(Placement):
    """Pre-Post-LN (Xie et al. 2023): b = F(x); d <- d + s*b; x <- LN(x + b); end alpha*x + LN_f(d).

    As in microsoft/ResiDual (resi_dual/resi_dual.py and resi_dual_layers.py): the dual stream
    starts at the embedding output, d0 = s * x0, and every sublayer adds its output scaled by
    the same s (`res = res + x * s`), so d = s * (x0 + sum of b) and LN_f(d) does not depend
    on s up to LN_f's eps: s (`res_input_norm_scale`, default 1) only keeps d in fp16 range.
    The same dropped-out b feeds both streams, and LN_f has eps 1e-7 (the others 1e-5).
    """

    name = "residual"
    final_norm = True
    gradient_profile = "floor"  # the dual (Pre-LN) path: Xie et al. 2023, Sec. 4
    final_norm_eps = 1e-7
    streams = ("x", "d")
    pre_ln_streams = ("d",)  # the dual stream is Pre-LN by design; x is Post-LN
    in_paper = True

    def begin(self, x0, stack):
        return x0, self.cfg.res_input_norm_scale * x0

    def sublayer(self, xd, f, s, blk):
        x, d = xd
        b = f(x)
        return s.norm(x + b), d + self.cfg.res_input_norm_scale * b

    def end(self, xd, stack):
        x, d = xd
        return self.cfg.alpha * x + stack.final_norm(d)


@register
class DeepNorm(Placement):
    """x <- LN(alpha * x + F(x)); beta scales the init of v, out, fc1, fc2 (Wang et al. 2022)."""

    name = "deepnorm"
    # No source states a per-block profile: each sublayer's LN sees alpha*x + F(x), whose factor
    # alpha / sqrt(alpha^2 + Var F) is near 1 at depth, not Post-LN's 1/sqrt(2).

    def __init__(self, cfg, role):
        super().__init__(cfg, role)
        self.alpha, self.beta = deepnorm_constants(cfg, role)

    def sublayer(self, x, f, s, blk):
        return s.norm(self.alpha * x + f(x))

    @torch.no_grad()
    def init_(self, stack):
        for blk in stack.layers:
            for s in blk.sublayers():
                for lin in deepnorm_scaled(s):
                    lin.weight.mul_(self.beta)
                    if lin.bias is not None:
                        lin.bias.mul_(self.beta)


def deepnorm_scaled(s: nn.Module) -> list[nn.Module]:
    """The linear maps DeepNorm down-scales at init: attention's v and out, the FFN's fc1 and fc2."""
    names = ("v_proj", "out_proj", "fc1", "fc2")
    return [getattr(s, n) for n in names if hasattr(s, n)]


def deepnorm_constants(cfg: PlacementConfig, role: str) -> tuple[float, float]:
    """(alpha, beta) for this stack's role, as the DeepNet paper states them (Wang et al. 2022, Fig. 2).

    Encoder-only (N blocks) and decoder-only (M blocks): alpha = (2L)^(1/4), beta = (8L)^(-1/4).
    Encoder-decoder: encoder alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16);
    decoder alpha = (3M)^(1/4), beta = (12M)^(-1/4).

    The paper's reading is taken over torchscale's code, which agrees on every alpha and on
    the decoder's beta but divides the encoder-decoder encoder's weights by
    (N^4 M)^(1/16) / 1.15, i.e. beta = 1.15 (N^4 M)^(-1/16) (torchscale/architecture/encoder.py).
    The two differ only in that initialization; a loaded checkpoint carries its own weights,
    and alpha, the only constant in the forward pass, is the same in both.
    """
    N, M = cfg.stack_depth("encoder"), cfg.stack_depth("decoder")
    if cfg.arch == "seq2seq":
        if role == "encoder":
            return 0.81 * (N**4 * M) ** (1 / 16), 0.87 * (N**4 * M) ** (-1 / 16)
        return (3 * M) ** 0.25, (12 * M) ** -0.25
    L = N if cfg.arch == "encoder" else M
    return (2 * L) ** 0.25, (8 * L) ** -0.25


@register
class Sandwich(Placement):
    """x <- x + LN(F(LN(x))); LN(x) at the end (Ding et al. 2021, CogView)."""

    name = "sandwich"
    sublayer_norms = 2
    final_norm = True

    def sublayer(self, x, f, s, blk):
        return x + s.out_norm(f(s.norm(x)))


@register
class PeriLN(Sandwich):
    """Sandwich plus an LN on the embedding output (Kim et al. 2025)."""

    name = "peri-ln"
    embed_norm = True


@register
class B2T(Placement):
    """Bottom-to-top (Takase et al. 2023): h = LN(x + Attn(x)); x <- LN(h + FFN(h) + x).

    In a decoder block the cross-attention is a Post-LN sublayer between the two; the block's
    input x skips to the last LN.
    """

    name = "b2t"

    def block(self, x, subs, blk):
        h = x
        for f, s in subs[:-1]:
            h = s.norm(h + f(h))
        f, s = subs[-1]
        return s.norm(h + f(h) + x)


@register
class MixLN(Placement):
    """Post-LN for the first floor(rho * N) blocks, Pre-LN after; LN at the end (Li et al. 2024).

    The Mix-LN paper applies Post-LN to the first floor(alpha L) layers and its code takes an
    integer count of Post-LN layers; `mix_ratio` is the paper's alpha (rho here).
    """

    name = "mix-ln"
    final_norm = True

    def __init__(self, cfg, role):
        super().__init__(cfg, role)
        # Blocks k < switch are Post-LN. The 1e-9 only absorbs binary rounding, so that a ratio
        # written as p/N gives p blocks (15/22 * 22 is 14.999999999999998 in floating point).
        self.switch = math.floor(cfg.mix_ratio * self.depth + 1e-9)
        # A stack that is Post-LN throughout ends like Post-LN, without a final LN.
        self.final_norm = self.switch < self.depth

    def sublayer(self, x, f, s, blk):
        if blk.k < self.switch:
            return s.norm(x + f(x))
        return x + f(s.norm(x))


@register
class LNS(Placement):
    """LayerNorm Scaling (Sun et al. 2025): x <- x + F(LN(x) / sqrt(k)), k 1-indexed; LN at the end."""

    name = "lns"
    final_norm = True

    def sublayer(self, x, f, s, blk):
        return x + f(s.norm(x) / math.sqrt(blk.k + 1))


@register
class DyT(Placement):
    """Pre-LN with every norm a Dynamic Tanh: x <- x + F(DyT(x)), DyT(x) = gamma * tanh(alpha * x)
    + beta, alpha one scalar per norm, 0.5 at init; DyT(x) at the end of the stack (Zhu et al.
    2025, arXiv 2503.10622; jiachenzhu/DyT dynamic_tanh.py). The Pre-LN toy model and its gradient
    floor assume normalized branch inputs; no source states DyT's, so no reference is drawn."""

    name = "dyt"
    norm = "dyt"
    final_norm = True

    def sublayer(self, x, f, s, blk):
        return x + f(s.norm(x))


@register
class DyTLLaMA(DyT):
    """DyT as the paper trains LLaMA (Zhu et al. 2025, Sec. 7; jiachenzhu/DyT other_tasks/LLaMA):
    no bias (gamma * tanh(alpha x)) and alpha started per position, attention / FFN / final norm,
    `alpha0` (the 7B recipe's 0.8 / 0.2 / 0.2; the paper lowers them as width grows: change the
    class attribute for another width)."""

    name = "dyt-llama"
    norm = "dyt-nobias"
    alpha0 = {"attn": 0.8, "ffn": 0.2, "final": 0.2}

    @torch.no_grad()
    def init_(self, stack):
        for blk in stack.layers:
            for s in blk.sublayers():
                s.norm.alpha.fill_(self.alpha0["ffn" if s is blk.ffn else "attn"])
        stack.final_norm.alpha.fill_(self.alpha0["final"])


@register
class HybridNorm(Placement):
    """HybridNorm (Zhuo et al. 2025, arXiv 2503.04598; BryceZhuo/HybridNorm): attention with q, k
    and v normalized per head and no norm before it, then the FFN's norm on the sum, the FFN's
    residual taken after that norm: y = x + Attn_QKVnorm(x); x <- LN(y) + FFN(LN(y)); LN at the
    end (the reference's OLMo base always applies ln_f). A seq2seq decoder's cross-attention is
    treated like the self-attention."""

    name = "hybridnorm"
    final_norm = True
    qkv_norm = True

    def sublayer_norm_count(self, kind, k):
        return 0 if kind == "attn" else 1

    def sublayer(self, x, f, s, blk):
        if s.norm is None:  # an attention sublayer
            return x + f(x)
        h = s.norm(x)
        return h + f(h)


@register
class NGPT(Placement):
    """The normalized Transformer (Loshchilov et al. 2024, arXiv 2410.01131; NVIDIA/ngpt model.py,
    train.py): no norms; the stream lives on the unit sphere, h <- unit(h + |alpha| * (unit(F(h)) -
    h)), alpha one vector of width d per sublayer; the embedding output normalized at the start.

    Inside F: q and k of each head are unit vectors times s_qk and the softmax reads
    q k^T * sqrt(head_dim); the FFN scales fc1's output by s_u * sqrt(d) before its ReLU; the
    logits are s_z * (W h). No linear map has a bias, and every weight matrix and embedding has unit
    rows along the embedding dimension, at init and after every optimizer step (`after_step`).
    alpha, s_qk, s_u and s_z are `StoredScale`s with the reference's (init, scaling): (0.05, d^-1/2),
    (1, d^-1/2), (1, 1), (1, d^-1/2). Positions stay our sinusoidal table added to the embedding
    (the reference rotates q, k: RoPE); the FFN stays ReLU (the reference's is SwiGLU with s_u, s_v)."""

    name = "ngpt"
    sublayer_norms = 0
    linear_bias = False
    init_schemes = ("fairseq",)  # xiong's W^Q = W^K = 0 has no direction to put on the sphere

    def begin(self, x0, stack):
        return unit(x0)

    def sublayer(self, x, f, s, blk):
        return unit(x + s.alpha.value().abs() * (unit(f(x)) - x))

    def add_parameters(self, blk):
        d, heads = self.cfg.d_model, self.cfg.heads
        base = d**-0.5
        for s in blk.sublayers():
            s.alpha = StoredScale((d,), 0.05, base)  # the reference's attn_alpha / mlp_alpha
        for attn in (blk.self_attn, blk.cross_attn):
            if attn is not None:  # one s_qk for q and k, as the reference's sqk
                attn.q_norm = attn.k_norm = ScaledUnitNorm(
                    StoredScale((heads, 1, d // heads), 1.0, base)
                )
                attn.scale = math.sqrt(d // heads)
        blk.ffn.hidden_scale = StoredScale((self.cfg.ffn,), 1.0, 1.0, factor=math.sqrt(d))

    def output_head(self, d, vocab):
        return ScaledLinear(d, vocab, StoredScale((vocab,), 1.0, d**-0.5))

    @torch.no_grad()
    def init_model_(self, stack, model):
        self.after_step(stack, model)

    @torch.no_grad()
    def after_step(self, stack, model):
        """Unit rows along the embedding dimension (train.py's normalize_matrices): dim 1 of the
        maps that read the stream (q, k, v, fc1; the embeddings), dim 0 of those that write it
        (out, fc2); the output projection by the stack that feeds it."""
        mats = [(stack.embed_tokens.weight, 1)]
        for blk in stack.layers:
            for s in blk.sublayers():
                if hasattr(s, "fc1"):
                    mats += [(s.fc1.weight, 1), (s.fc2.weight, 0)]
                else:
                    mats += [(s.q_proj.weight, 1), (s.k_proj.weight, 1), (s.v_proj.weight, 1)]
                    mats.append((s.out_proj.weight, 0))
        if stack is (model.decoder or model.encoder):
            mats.append((model.output_projection.weight, 1))
        for w, dim in mats:
            w.copy_(torch.nn.functional.normalize(w, dim=dim))


@register
class TFixup(Placement):
    """T-Fixup (Huang et al. 2020; layer6ai-labs/T-Fixup): x <- x + F(x), no LayerNorm anywhere, and
    an initialization that lets it train without warm-up: v, out, fc1 and fc2 Xavier, then their
    weights times `scale`, the token embedding N(0, d^-1/2) times `embed_scale` (`tfixup_constants`)."""

    name = "tfixup"
    sublayer_norms = 0

    def __init__(self, cfg, role):
        super().__init__(cfg, role)
        self.scale, self.embed_scale = tfixup_constants(cfg, role)

    def sublayer(self, x, f, s, blk):
        return x + f(x)

    @torch.no_grad()
    def init_(self, stack):
        for blk in stack.layers:
            for s in blk.sublayers():
                # Xavier (gain 1) as the reference has them: its fairseq draws v at gain 1/sqrt(2)
                # and multiplies by sqrt(2), and its fc1, fc2 are Xavier with zero bias; out_proj
                # is Xavier with zero bias under both of our schemes already.
                ffn = hasattr(s, "fc1")
                for lin in (s.fc1, s.fc2) if ffn else (s.v_proj,):
                    nn.init.xavier_uniform_(lin.weight)
                    if ffn:
                        nn.init.zeros_(lin.bias)
                for lin in deepnorm_scaled(s):  # v, out, fc1, fc2: weights only, as the reference
                    lin.weight.mul_(self.scale)
        # A table shared by both stacks is scaled once, by the encoder (the reference's decoder
        # skips it under --share-all-embeddings); a tied output projection is this table.
        if not (self.role == "decoder" and self.cfg.share_all_embeddings):
            stack.embed_tokens.weight.mul_(self.embed_scale)


def tfixup_constants(cfg: PlacementConfig, role: str) -> tuple[float, float]:
    """(block scale, embedding scale) of this stack, as layer6ai-labs/T-Fixup's fixup_initialization
    (fairseq/modules/transformer_layer.py) and its embedding scaling (fairseq/models/transformer.py):
    encoder blocks 0.67 N^(-1/4), decoder blocks (9M)^(-1/4), each stack's embedding (9L)^(-1/4) with
    its own L. A one-stack model takes its role's constants (a decoder-only LM the decoder's)."""
    L = cfg.stack_depth(role)
    block = 0.67 * L**-0.25 if role == "encoder" else (9 * L) ** -0.25
    return block, (9 * L) ** -0.25


ROLES = ("encoder", "decoder")
ADMIN_PROFILE_SHAPE = (8, 32)  # sequences x tokens of Admin's profiling batch (tokens <= max_len)
ADMIN_PROFILE_SEED = 0  # draws its tokens and, under fork_rng, its dropout masks


def admin_profile_tokens(cfg: PlacementConfig) -> dict[str, torch.Tensor]:
    """The seeded random token batches Admin profiles on, per stack role: uniform over the
    vocabulary, the same for every model of this vocabulary and max_len."""
    g = torch.Generator().manual_seed(ADMIN_PROFILE_SEED)
    shape = (ADMIN_PROFILE_SHAPE[0], min(ADMIN_PROFILE_SHAPE[1], cfg.max_len))
    return {role: torch.randint(cfg.vocab_size, shape, generator=g) for role in ROLES}


@register
class Admin(Placement):
    """Admin (Liu et al. 2020, arXiv 2004.08249; LiyuanLucasLiu/Transformer-Clinic): Post-LN with the
    stream weighted, x <- LN(x * omega + F(x)), omega one vector of width d per sublayer, set by a
    profiling forward at build time (`init_model_`)."""

    name = "admin"

    def sublayer(self, x, f, s, blk):
        b = f(x)  # before s.omega is read: the profiling pass sets it as F returns
        return s.norm(x * s.omega + b)

    def add_parameters(self, blk):
        for s in blk.sublayers():
            s.omega = nn.Parameter(torch.ones(self.cfg.d_model))

    @torch.no_grad()
    def init_model_(self, stack, model):
        """The reference's adaptive-profiling pass (fairseq/modules/transformer_layer.py): one
        training-mode forward in which the sublayers of the stack, in order, take omega_i = r, then
        r <- sqrt(Var(x_i * omega_i) + Var(F_i(x_i))), r = 1 at the stack's start; Var over every
        entry of the batch (np.var), F_i's output after its dropout. Here on
        `admin_profile_tokens`; a seq2seq decoder reads the (profiled) encoder's output."""
        ratio = 1.0

        def profile(s, args, out):
            nonlocal ratio
            s.omega.fill_(ratio)
            x = args[0]
            var = (x * s.omega).double().var(correction=0) + out.double().var(correction=0)
            ratio = float(var.sqrt())

        tokens = admin_profile_tokens(self.cfg)
        handles = [s.register_forward_hook(profile) for b in stack.layers for s in b.sublayers()]
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ADMIN_PROFILE_SEED)
                memory = None
                if self.role == "decoder" and model.encoder is not None:
                    memory = model.encoder(tokens["encoder"])
                stack(tokens[self.role], memory)
        finally:
            for h in handles:
                h.remove()


@register
class ReZero(Placement):
    """x <- x + a_k * F(x), one scalar a_k per block, zero at init, no LN (Bachlechner et al. 2021)."""

    name = "rezero"
    sublayer_norms = 0

    def sublayer(self, x, f, s, blk):
        return x + blk.gate * f(x)

    def add_parameters(self, blk):
        blk.gate = nn.Parameter(torch.zeros(()))


@register
class HybridNormStar(HybridNorm):
    """HybridNorm* (Zhuo et al. 2025): HybridNorm with a Pre-Norm first block (its attention
    normed before, as well as inside, and its FFN residual taken before the norm), as the
    reference's `norm_pos_special_config` {0: {attn_norm: True, ffn_residual: False}}."""

    name = "hybridnorm-star"

    def sublayer_norm_count(self, kind, k):
        return 1 if k == 0 else super().sublayer_norm_count(kind, k)

    def sublayer(self, x, f, s, blk):
        if blk.k == 0:
            return x + f(s.norm(x))
        return super().sublayer(x, f, s, blk)


@register
class DeepScale(Placement):
    """DeepScaleLM's residual scaling (Kedia et al. 2024, arXiv 2403.09635) on Pre-LN:
    x <- lambda x + beta F(LN(x)), lambda^2 + beta^2 = 1, beta^2 = k / N with k = 2 and N the
    stack's blocks (capped at 1), so the stream's variance stays that of its input at any depth;
    LN at the end. The paper's initialization scheme (weight variances for unit moments) is not
    part of it here (docs/design.md says why)."""

    name = "deepscale"
    final_norm = True
    k = 2.0

    def __init__(self, cfg, role):
        super().__init__(cfg, role)
        beta2 = min(1.0, self.k / self.depth) if self.depth else 1.0
        self.lam, self.beta = math.sqrt(1.0 - beta2), math.sqrt(beta2)

    def sublayer(self, x, f, s, blk):
        return self.lam * x + self.beta * f(s.norm(x))


@register
class HyperConnections(Placement):
    """Hyper-Connections (Zhu et al. 2024, arXiv 2409.19606) on a Pre-LN block: the stream is n
    copies h (.., n, C), the embedding output copied n times; around each sublayer
    u = sum_j pre_j h_j, y = F(LN(u)), h_k <- sum_j comb[j, k] h_j + post_k y, with the width
    and depth connections of `layers.HyperConnection` (static, plus dynamic unless
    `hc_dynamic=False`); at the end LN(sum_k h_k). Named as DeepSeek-V4 names its modules:
    `attn_hc`, `cross_hc`, `ffn_hc` on each block."""

    name = "hc"
    final_norm = True
    stacked = True
    constrained = False  # mHC: pre, post and comb projected (sigmoid, 2 sigmoid, Sinkhorn)

    def __init__(self, cfg, role):
        super().__init__(cfg, role)
        self.n = cfg.hc_streams
        self.streams = tuple(f"h{i}" for i in range(self.n))

    def begin(self, x0, stack):
        x0 = super().begin(x0, stack)
        return x0.unsqueeze(-2).expand(*x0.shape[:-1], self.n, x0.shape[-1]).contiguous()

    def block(self, h, subs, blk):
        for (f, s), hc in zip(subs, hyper_connections(blk), strict=True):
            post, comb, u = hc(h)
            h = comb.transpose(-1, -2) @ h + post.unsqueeze(-1) * f(s.norm(u)).unsqueeze(-2)
        return h

    def end(self, h, stack):
        return stack.final_norm(h.sum(dim=-2))

    def add_parameters(self, blk):
        from .layers import HyperConnection

        names = [n for n, s in zip(HC_NAMES, (1, blk.cross_attn, 1)) if s is not None]
        for i, name in enumerate(names):  # the static pre picks stream (sublayer index mod n)
            index = blk.k * len(names) + i
            hc = HyperConnection(
                self.cfg.d_model, self.n, index, self.constrained, self.cfg.hc_dynamic
            )
            setattr(blk, name, hc)


HC_NAMES = ("attn_hc", "cross_hc", "ffn_hc")  # a block's hyper-connections, in sublayer order


def hyper_connections(blk: nn.Module) -> list[nn.Module]:
    """A block's hyper-connection modules in sublayer order."""
    return [getattr(blk, n) for n in HC_NAMES if getattr(blk, n, None) is not None]


@register
class MHC(HyperConnections):
    """Manifold-constrained Hyper-Connections (Xie et al. 2026, arXiv 2512.24880; DeepSeek-V4): as
    `hc`, with pre = sigmoid, post = 2 sigmoid and comb doubly stochastic (Sinkhorn-Knopp, 20
    iterations), so the product of the comb matrices over depth stays doubly stochastic."""

    name = "mhc"
    constrained = True


def make_placement(cfg: PlacementConfig, role: str) -> Placement:
    return PLACEMENTS[cfg.placement](cfg, role)


# the ResiDual paper's comparison, in registry order: Post-LN, Pre-LN, ResiDual
PAPER_PLACEMENTS = tuple(name for name, cls in PLACEMENTS.items() if cls.in_paper)


ALL = "ALL"  # the keyword for every registered placement, where a command takes a list


def expand_placements(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`names` with the keyword ALL (any case) replaced by every registered placement, in registry
    order, duplicates dropped."""
    out: list[str] = []
    for n in names:
        out += list(PLACEMENTS) if n.upper() == ALL else [n]
    return tuple(dict.fromkeys(out))


def pre_ln_like(placement: str | None, stream: str) -> bool:
    """Whether `stream` of a model with this placement follows the Pre-LN toy model (False for a
    placement the registry does not know: a detected "other" or "unknown")."""
    cls = PLACEMENTS.get(placement or "")
    return cls is not None and stream in cls.pre_ln_streams
