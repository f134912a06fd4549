"""Which norm placement a model uses, read from what its blocks do, not from its class name.

One small forward with hooks on every block and on every norm inside a block, then per block:
- residual: the block carries two streams (ResiDual's x, d): x leaves through a norm, d does not;
- post-ln: the block's output *is* a norm's output (the stream is normalized after the sum);
- pre-ln: a norm reads the block's input unchanged (the branch sees LN(x), the stream does not);
- other: neither (ReZero's un-normalized stream, or a norm the hooks cannot see).
A model whose blocks disagree (Mix-LN) is "other", with the per-block kinds in `detail`.
Sandwich, Peri-LN and LNS are pre-ln by this test, DeepNorm and B2T post-ln: the test asks
only whether the stream itself is normalized, which decides the failure mode.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from ..probe.discovery import BlockInfo
from ..probe.stats import stream_tensors

KINDS = ("post-ln", "pre-ln", "residual", "other")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def classify(ins: tuple, outs: tuple, norm_calls: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    """One block's kind from its stream input(s), output(s) and the (input, output) of its norms."""
    normed = lambda t: any(_same(t, o) for _, o in norm_calls)  # noqa: E731
    if len(outs) == 2:
        return "residual" if normed(outs[0]) and not normed(outs[1]) else "other"
    if normed(outs[0]):
        return "post-ln"
    if any(_same(ins[0], i) for i, _ in norm_calls):
        return "pre-ln"
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


@torch.no_grad()
def detect_placement(blocks: list[BlockInfo], forward: Callable[[], object]) -> dict:
    """{"placement": kind, "stacks": {stack: kind}, "per_block": {stack: [kinds]}, "detail": str, "item_tokens"}.

    `forward` runs the model once on a small input; `blocks` come from the probe's discovery.
    """
    seen: dict[int, dict] = {}
    handles = []

    def on_norm(pos, module, args, output):
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            seen[pos]["norms"].append((args[0], output))

    def on_block(pos, module, args, kwargs, output):
        n = len(blocks[pos].streams)
        ins = stream_tensors(args[0] if args else kwargs.get("hidden_states"), n)
        outs = stream_tensors(output, n)
        if ins is not None and outs is not None and "kind" not in seen[pos]:
            seen[pos]["kind"] = classify(ins, outs, seen[pos]["norms"])
            seen[pos]["tokens"] = outs[0].shape[-2] if outs[0].dim() >= 2 else 1

    try:
        for pos, b in enumerate(blocks):
            seen[pos] = {"norms": []}
            handles.append(b.module.register_forward_hook(partial(on_block, pos), with_kwargs=True))
            for norm in b.norms.values():
                handles.append(norm.register_forward_hook(partial(on_norm, pos)))
        forward()
    finally:
        for h in handles:
            h.remove()
    per_block: dict[str, list[str]] = {}
    for pos, b in enumerate(blocks):
        per_block.setdefault(b.stack, []).append(seen[pos].get("kind", "other"))
    stacks = {s: (ks[0] if len(set(ks)) == 1 else "other") for s, ks in per_block.items()}
    overall = set(stacks.values())
    placement = overall.pop() if len(overall) == 1 else "other"
    detail = "; ".join(f"{s}: {_runs(ks)}" for s, ks in per_block.items())
    return {"placement": placement, "stacks": stacks, "per_block": per_block, "detail": detail,
            "item_tokens": seen[0].get("tokens") if seen else None}  # positions per input item (block 0)
