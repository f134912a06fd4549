"""Which norm placement a model uses, read from what its blocks do, not from its class name.

One small forward with hooks on every block, on every norm inside a block and on the norms
outside the blocks; then, per block, from its stream input x, its output y and the (input,
output) of each of its norms:
- residual: the block carries two streams (ResiDual's x, d): x leaves through a norm, d does not;
- post-ln: y *is* a norm's output (the stream is normalized after the sum; DeepNorm's alpha*x
  and B2T's extra skip sit inside that norm's input and are not told apart);
- sandwich: a norm reads x unchanged *and* y = x + the outputs of some norms (each sublayer's
  output normalized before it joins the stream: Gemma 2/3, CogView);
- res-post-ln: y = x + normalized sublayer outputs, but no norm reads x (OLMo 2's
  x + LN(F(x)), Swin v2's "res-post-norm"): the stream itself is never normalized;
- pre-ln: a norm reads x unchanged, and the branch outputs join the stream as they are (LNS's
  1/sqrt(k) scaling is inside the branch and counts as pre-ln);
- no-norm: the block has no norm on its stream (ReZero);
- other: none of these.
Per stack: one kind, or "mix-ln" for post-ln blocks followed by pre-ln blocks (Mix-LN), or
"other" with the per-block kinds in `detail`; "peri-ln" is a sandwich stack whose first block
reads the output of a norm outside the blocks (the embedding's LN). Norms inside attention that
normalize queries and keys (OLMo 2's q_norm/k_norm; HybridNorm's v_norm too) are not stream
norms; they are reported as QK-norm. The norm type (layernorm / rmsnorm / dyt) is read from behaviour: LayerNorm ignores a
constant shift of its input, RMSNorm does not, DyT squashes any input into a bounded range; a
Pre-LN stack whose norms are all DyT is labelled "dyt" (Zhu et al. 2025).
"""

from __future__ import annotations

import itertools
import re
from functools import partial
from typing import Callable

import torch
from torch import nn

from .discovery import BlockInfo, is_norm, squashes
from .stats import stream_tensors

KINDS = ("post-ln", "pre-ln", "residual", "sandwich", "res-post-ln", "no-norm", "other")
QK_NORM = re.compile(r"(^|[._])(q|k|v|query|key|value)_?(norm|layernorm|ln)$", re.IGNORECASE)
MAX_SUBSET_NORMS = 8  # norms per block searched for y = x + sum of normalized branches (2^8 sums)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.detach().abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(scale, 1.0)))


def _adds_normed(x: torch.Tensor, y: torch.Tensor, outs: list[torch.Tensor]) -> bool:
    """True when y = x + (a sum, in forward order, of some of the norm outputs `outs`)."""
    outs = [o for o in outs if o.shape == y.shape][:MAX_SUBSET_NORMS]
    for r in range(1, len(outs) + 1):
        for subset in itertools.combinations(outs, r):
            s = x
            for o in subset:
                s = s + o
            if _close(s, y):
                return True
    return False


def classify(ins: tuple, outs: tuple, norm_calls: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    """One block's kind from its stream input(s), output(s) and the (input, output) of its stream norms."""
    normed = lambda t: any(_close(t, o) for _, o in norm_calls)  # noqa: E731
    if len(outs) == 2:
        return "residual" if normed(outs[0]) and not normed(outs[1]) else "other"
    x, y = ins[0], outs[0]
    if not norm_calls:
        return "no-norm"
    if normed(y):
        return "post-ln"
    reads = any(_close(i, x) for i, _ in norm_calls)
    adds = _adds_normed(x, y, [o for _, o in norm_calls])
    if reads:
        return "sandwich" if adds else "pre-ln"
    return "res-post-ln" if adds else "other"


def norm_type(module: nn.Module, width: int) -> str:
    """layernorm (invariant to a constant shift of the input), rmsnorm (to scale, not shift), dyt
    (a bounded tanh squash, `discovery.squashes`), or other."""
    if squashes(module):
        return "dyt"
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else "cpu"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, width, generator=gen).to(device=device, dtype=dtype)
    try:
        with torch.no_grad():
            base = module(x)
            shifted = module(x + 3.0)
            scaled = module(2.0 * x)
    except Exception:
        return "other"
    if not all(isinstance(t, torch.Tensor) for t in (base, shifted, scaled)):
        return "other"
    tol = dict(rtol=1e-3, atol=1e-4)
    if torch.allclose(base, shifted, **tol):
        return "layernorm"
    if torch.allclose(base, scaled, **tol):
        return "rmsnorm"
    return "other"


def _runs(kinds: list[str]) -> str:
    """'post-ln 0-1, pre-ln 2-5' for a list of per-block kinds."""
    parts, start = [], 0
    for k in range(1, len(kinds) + 1):
        if k == len(kinds) or kinds[k] != kinds[start]:
            span = f"{start}" if k - 1 == start else f"{start}-{k - 1}"
            parts.append(f"{kinds[start]} {span}")
            start = k
    return ", ".join(parts)


def stack_kind(kinds: list[str], embed_normed: bool) -> str:
    if len(set(kinds)) == 1:
        kind = kinds[0]
        return "peri-ln" if kind == "sandwich" and embed_normed else kind
    switch = kinds.index("pre-ln") if "pre-ln" in kinds else len(kinds)
    if set(kinds[:switch]) == {"post-ln"} and set(kinds[switch:]) == {"pre-ln"}:
        return "mix-ln"
    return "other"


class StructureWatch:
    """Hooks that classify each block the first time it runs (`classify`), and the stack's
    placement from those kinds (`result`). Each block is classified inside its own hook and its
    norms' tensors dropped there, so watching a training forward holds no activations past it."""

    def __init__(self, blocks: list[BlockInfo], model: nn.Module | None = None):
        self.blocks = blocks
        self.seen: dict[int, dict] = {pos: {"norms": []} for pos in range(len(blocks))}
        self.outside: list[torch.Tensor] = []
        self.handles = []
        self.stream_norms: dict[int, dict[str, nn.Module]] = {}
        self.qk = False
        in_blocks = {id(m) for b in blocks for m in b.module.modules()}
        for pos, b in enumerate(blocks):
            self.stream_norms[pos] = {n: m for n, m in b.norms.items() if not QK_NORM.search(n)}
            self.qk |= len(self.stream_norms[pos]) < len(b.norms)
            self.handles.append(
                b.module.register_forward_hook(partial(self._on_block, pos), with_kwargs=True)
            )
            for norm in self.stream_norms[pos].values():
                self.handles.append(norm.register_forward_hook(partial(self._on_norm, pos)))
        if model is not None:  # the norms outside the blocks, for Peri-LN's embedding LN
            for m in model.modules():
                if (
                    id(m) not in in_blocks
                    and is_norm(m)
                    and not any(is_norm(c) for c in m.children())
                ):
                    self.handles.append(m.register_forward_hook(self._on_outside))

    def _on_norm(self, pos, module, args, output):
        if "kind" not in self.seen[pos] and args and isinstance(args[0], torch.Tensor):
            if isinstance(output, torch.Tensor):
                self.seen[pos]["norms"].append((args[0].detach(), output.detach()))

    def _on_outside(self, module, args, output):
        if isinstance(output, torch.Tensor) and not all("kind" in v for v in self.seen.values()):
            self.outside.append(output.detach())

    @torch.no_grad()
    def _on_block(self, pos, module, args, kwargs, output):
        seen = self.seen[pos]
        if "kind" in seen:
            return
        n = len(self.blocks[pos].streams)
        stacked = self.blocks[pos].stacked
        ins = stream_tensors(args[0] if args else kwargs.get("hidden_states"), n, stacked)
        outs = stream_tensors(output, n, stacked)
        if ins is None or outs is None:
            return
        seen["kind"] = classify(ins, outs, seen.pop("norms"))
        seen["tokens"] = outs[0].shape[-2] if outs[0].dim() >= 2 else 1
        seen["width"] = outs[0].shape[-1]
        if self.blocks[pos].index == 0:
            seen["embed_normed"] = any(_close(ins[0], o) for o in self.outside)
        if all("kind" in v for v in self.seen.values()):
            self.outside = []  # every block seen: nothing left to compare with

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def result(self) -> dict:
        """The hooks removed, what the blocks seen so far say (`detect_placement`'s dict)."""
        self.remove()
        blocks, seen, stream_norms = self.blocks, self.seen, self.stream_norms
        per_block: dict[str, list[str]] = {}
        embed_normed: dict[str, bool] = {}
        for pos, b in enumerate(blocks):
            per_block.setdefault(b.stack, []).append(seen[pos].get("kind", "other"))
            if b.index == 0:
                embed_normed[b.stack] = bool(seen[pos].get("embed_normed"))
        stacks = {s: stack_kind(ks, embed_normed.get(s, False)) for s, ks in per_block.items()}
        overall = set(stacks.values())
        placement = overall.pop() if len(overall) == 1 else "other"
        types = set()
        for pos in seen:
            width = seen[pos].get("width")
            for m in stream_norms[pos].values():
                if width:
                    types.add(norm_type(m, int(width)))
        ntype = (
            types.pop()
            if len(types) == 1
            else ("none" if not types else "mixed: " + ", ".join(sorted(types)))
        )
        if placement == "pre-ln" and ntype == "dyt":  # Pre-LN arranged, every norm a DyT
            placement = "dyt"
            stacks = {s: "dyt" for s in per_block}
        detail = "; ".join(f"{s}: {_runs(ks)}" for s, ks in per_block.items())
        if self.qk:
            detail += "; QK-norm in attention"
        return {
            "placement": placement,
            "stacks": stacks,
            "per_block": per_block,
            "detail": detail,
            "norm_type": ntype,
            "qk_norm": self.qk,
            "item_tokens": seen[0].get("tokens") if seen else None,
        }  # positions per input item (block 0)


@torch.no_grad()
def detect_placement(
    blocks: list[BlockInfo], forward: Callable[[], object], model: nn.Module | None = None
) -> dict:
    """{"placement", "stacks": {stack: kind}, "per_block": {stack: [kinds]}, "detail", "norm_type",
    "qk_norm", "item_tokens"}.

    `forward` runs the model once on a small input; `blocks` come from the probe's discovery;
    `model` (optional) lets the norms outside the blocks be watched, for Peri-LN's embedding LN.
    """
    watch = StructureWatch(blocks, model)
    try:
        forward()
    finally:
        watch.remove()
    return watch.result()
