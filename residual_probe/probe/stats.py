"""Helpers the hooks share: the residual stream tensors in a block's input or output, and
their local parts where they are DTensors (tensor and sequence parallelism).

(The per-quantity reductions live in `quantities/`; this module stays as the place other
packages import `stream_tensors` from.)
"""

from __future__ import annotations

import torch


def stream_tensors(value, n_streams: int, stacked: bool = False) -> tuple[torch.Tensor, ...] | None:
    """The residual stream tensors in a block's input or output, or None if there are none.

    A tensor is one stream; a tuple is ResiDual's (x, d) when the block has two streams, else
    a Hugging Face output whose first element is the hidden state. `stacked`: the n streams are
    one tensor (.., n, C) (hyper-connections), returned as its n views along dim -2.
    """
    if stacked:
        if isinstance(value, (tuple, list)) and value:
            value = value[0]
        ok = isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[-2] == n_streams
        return value.unbind(-2) if ok else None
    if isinstance(value, torch.Tensor):
        return (value,) if n_streams == 1 else None
    if isinstance(value, (tuple, list)) and len(value) >= n_streams:
        head = tuple(value[:n_streams])
        if all(isinstance(t, torch.Tensor) for t in head):
            return head
    return None


def whole_tokens(t) -> bool:
    """Whether a DTensor's local part is a set of whole tokens of the global tensor: replicated, or
    sharded on a token dimension (sequence parallelism), not on the features (the last dimension)
    and with no Partial sum pending. Token means pooled across the ranks are then global means."""
    last = t.dim() - 1
    for p in t.placements:
        if p.is_partial():
            return False
        if not p.is_replicate():
            dim = getattr(p, "dim", None)
            if dim is None or dim % t.dim() == last:
                return False
    return True


def local_streams(streams: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
    """The streams as this rank holds them: a DTensor (tensor or sequence parallelism) gives its
    local tensor, with no collective and no autograd node. None when a DTensor's local part is
    not whole tokens (`whole_tokens`): no token statistic can be taken from it on this rank."""
    from .gradnorm import dtensor_type

    cls = dtensor_type()
    if cls is None or not any(isinstance(t, cls) for t in streams):
        return streams
    out = []
    for t in streams:
        if isinstance(t, cls):
            if not whole_tokens(t):
                return None
            with torch.no_grad():
                t = t.to_local()  # the local tensor itself: the same object for the same DTensor
        out.append(t)
    return tuple(out)
