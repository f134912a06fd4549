"""Where attn_logits sees q and k: the attention modules inside a block, and a hook on each.

Three kinds, each handing the quantity what the softmax is built from (`Scores`: q and k as the
attention multiplies them, the scale, the mask, causality, soft-capping):
- residual-probe's own `models.layers.Attention`: its `observer` attribute, called before SDPA;
- torch's `nn.MultiheadAttention` (inside `nn.TransformerEncoderLayer` and the like): a forward
  pre-hook that recomputes q and k from the module's in-projection and merges attn_mask,
  key_padding_mask, bias_k and add_zero_attn as `F.multi_head_attention_forward` does;
- Hugging Face attention modules that dispatch through `ALL_ATTENTION_FUNCTIONS` (transformers
  >= 4.48): the model's own attention function is wrapped, the registered one for "sdpa" (in
  the interface's local mapping) and the family module's `eager_attention_forward` for "eager",
  so the model keeps running its own kernel; the wrapper hands q, k and the mask to the quantity
  and calls the original. The wrapper is installed while a probe needs it and removed after
  (reference counted); for modules no probe watches it only calls the original.
Any other attention (flash / flex kernels, custom code) is not seen: the quantity says so,
naming the block class, and records nothing for those blocks rather than a wrong number.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import compiler_disable


@dataclass
class Scores:
    """The inputs of one attention's softmax: logits = softcap(q k^T * scaling) + mask.

    q (B, H, T, D); k (B, Hk, S, D), Hk dividing H (grouped-query kv heads are repeated);
    mask None, bool (True: attend) or additive float (entries at or below half the dtype's most
    negative value, or -inf, are masked), broadcastable to (B, H, T, S); causal: SDPA's is_causal,
    query i sees keys 0..i."""

    q: torch.Tensor
    k: torch.Tensor
    scaling: float | None = None  # None: 1/sqrt(D)
    mask: torch.Tensor | None = None
    causal: bool = False
    softcap: float | None = None


Observe = Callable[[Scores], None]  # called with the scores of a forward (the quantity's callback)
Unseen = Callable[[str], None]  # called with why an attention call could not be read


def attention_modules(block: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path inside the block, module, kind) of each attention the probe can read, in module
    order: kind "ours", "mha" or "hf". Hugging Face: the innermost modules named *Attention that
    dispatch through ALL_ATTENTION_FUNCTIONS."""
    from ...models.layers import Attention

    found = []
    for name, m in block.named_modules():
        if isinstance(m, Attention):
            found.append((name, m, "ours"))
        elif isinstance(m, nn.MultiheadAttention):
            found.append((name, m, "mha"))
        elif _hf_dispatches(m) and not any(_hf_dispatches(c) for c in m.modules() if c is not m):
            found.append((name, m, "hf"))
    return found


def _hf_dispatches(m: nn.Module) -> bool:
    if not type(m).__name__.endswith("Attention"):
        return False
    impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
    if not isinstance(impl, str):
        return False
    try:
        src = inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


# ---- residual-probe's Attention ------------------------------------------------------------


class OursHook:
    def __init__(self, module: nn.Module, observe: Observe):
        self.module = module
        # eager under torch.compile, as the blocks' hooks: a graph break, no guards on its state
        module.observer = compiler_disable(
            lambda q, k, causal: observe(Scores(q, k, module.scale, None, causal))
        )

    def remove(self) -> None:
        self.module.__dict__.pop("observer", None)  # back to the class default, None


# ---- torch.nn.MultiheadAttention ------------------------------------------------------------


class MHAHook:
    """A forward pre-hook (with kwargs) recomputing q and k as F.multi_head_attention_forward does."""

    def __init__(self, module: nn.MultiheadAttention, observe: Observe, unseen: Unseen):
        self.observe, self.unseen = observe, unseen
        self.handle = module.register_forward_pre_hook(compiler_disable(self), with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()

    def __call__(self, m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
        given = {**dict(zip(names, args)), **kwargs}
        query, key = given.get("query"), given.get("key")
        if not isinstance(query, torch.Tensor) or query.is_nested or key.is_nested:
            self.unseen("nested-tensor inputs")
            return
        attn_mask, pad = given.get("attn_mask"), given.get("key_padding_mask")
        if query.dim() == 2:  # unbatched (T, E)
            query, key = query.unsqueeze(0), key.unsqueeze(0)
            pad = pad.unsqueeze(0) if pad is not None else None
        elif not m.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)  # (B, T, E)
        E, H = m.embed_dim, m.num_heads
        if m._qkv_same_embed_dim:
            w_q, w_k = m.in_proj_weight[:E], m.in_proj_weight[E : 2 * E]
        else:
            w_q, w_k = m.q_proj_weight, m.k_proj_weight
        b = m.in_proj_bias
        b_q, b_k = (None, None) if b is None else (b[:E], b[E : 2 * E])
        B, T, S = query.shape[0], query.shape[1], key.shape[1]
        q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
        dtype = torch.promote_types(q.dtype, torch.float32)
        bias = torch.zeros(B, H, T, S, dtype=dtype, device=q.device)  # additive mask
        if attn_mask is not None:
            am = attn_mask.view(-1, H, T, S) if attn_mask.dim() == 3 else attn_mask
            bias = bias.masked_fill(am, -float("inf")) if am.dtype == torch.bool else bias + am
        if pad is not None:
            pm = pad[:, None, None, :]
            bias = bias.masked_fill(pm, -float("inf")) if pm.dtype == torch.bool else bias + pm
        if m.bias_k is not None:  # a learned key appended to every sequence; masks get a 0 column
            k = torch.cat([k, m.bias_k.reshape(1, 1, E).expand(B, 1, E)], 1)
            bias = F.pad(bias, (0, 1))
        q = q.view(B, T, H, E // H).transpose(1, 2)
        k = k.view(B, -1, H, E // H).transpose(1, 2)
        if m.add_zero_attn:  # a zero key appended after the heads split
            k = torch.cat([k, k.new_zeros(B, H, 1, E // H)], 2)
            bias = F.pad(bias, (0, 1))
        self.observe(Scores(q, k, None, bias))


# ---- Hugging Face attention functions -------------------------------------------------------

_WATCHED: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()
_PATCHES: dict[tuple, list] = {}  # key -> [restore callable, users]
SUPPORTED = ("eager", "sdpa")  # implementations whose mask and causality rules `hf_scores` knows


def _wrap(original: Callable, impl: str) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        watch = _WATCHED.get(module)
        if watch is not None:
            watch(impl, module, query, key, attention_mask, args, kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__wrapped__ = original
    attention.__name__ = getattr(original, "__name__", "attention")
    return attention


def _patch_point(module: nn.Module, impl: str) -> tuple[tuple, Callable, Callable] | None:
    """(key, install, restore) of where the module's attention function `impl` is looked up."""
    if impl == "eager":
        family = sys.modules.get(type(module).__module__)
        original = getattr(family, "eager_attention_forward", None)
        if original is None:
            return None

        def install():
            family.eager_attention_forward = _wrap(original, impl)

        def restore():
            family.eager_attention_forward = original

        return ("module", family.__name__), install, restore
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as fns

    if impl not in fns:
        return None
    local = fns._local_mapping
    had, before = impl in local, local.get(impl)
    original = fns[impl]

    def install():
        fns[impl] = _wrap(original, impl)

    def restore():
        if had:
            local[impl] = before
        else:
            local.pop(impl, None)

    return ("interface", impl), install, restore


class HFHook:
    """Watch one Hugging Face attention module through the wrapped attention function."""

    def __init__(self, module: nn.Module, observe: Observe, unseen: Unseen):
        self.module, self.observe, self.unseen, self.key = module, observe, unseen, None
        impl = module.config._attn_implementation
        point = _patch_point(module, impl) if impl in SUPPORTED else None
        if point is None:
            unseen(f"attn_implementation {impl!r}")
            return
        self.key, install, restore = point
        entry = _PATCHES.get(self.key)
        if entry is None:
            install()
            entry = _PATCHES[self.key] = [restore, 0]
        entry[1] += 1
        _WATCHED[module] = compiler_disable(self)

    def remove(self) -> None:
        _WATCHED.pop(self.module, None)
        entry = _PATCHES.get(self.key) if self.key is not None else None
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                entry[0]()
                del _PATCHES[self.key]
        self.key = None

    def __call__(self, impl, module, query, key, mask, args, kwargs) -> None:
        scores = hf_scores(impl, module, query, key, mask, args, kwargs)
        if isinstance(scores, str):
            self.unseen(scores)
        else:
            self.observe(scores)


def hf_scores(
    impl: str, module, query, key, mask, args: tuple, kwargs: dict[str, Any]
) -> Scores | str:
    """The softmax inputs of a Hugging Face attention call, by the rules of `impl` (transformers'
    integrations/sdpa_attention.py and the families' eager_attention_forward); a string saying
    why not where the call carries what these rules do not cover."""
    if args:
        return "positional arguments after the mask"
    if kwargs.get("position_bias") is not None:
        return "a position bias"
    if kwargs.get("softcap") is not None and impl == "sdpa":
        return "soft-capping under sdpa"  # transformers refuses it too
    T, S = query.shape[2], key.shape[2]
    if mask is not None and mask.shape[-1] > S:  # eager slices a longer mask to the keys
        mask = mask[..., :S]
    causal = False
    if impl == "sdpa":
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        causal = bool(T > 1 and mask is None and is_causal)
        if causal and S > T:  # sdpa_attention_forward crops the keys (upper-left causal)
            key = key[:, :, :T]
    return Scores(query, key, kwargs.get("scaling"), mask, causal, kwargs.get("softcap"))


def watch(kind: str, module: nn.Module, observe: Observe, unseen: Unseen):
    """The hook for one attention module of `kind` ("ours", "mha", "hf"); `.remove()` undoes it."""
    if kind == "ours":
        return OursHook(module, observe)
    if kind == "mha":
        return MHAHook(module, observe, unseen)
    return HFHook(module, observe, unseen)
