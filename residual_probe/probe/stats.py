"""Helpers the hooks share: the residual stream tensors in a block's input or output.

(The per-quantity reductions live in `quantities/`; this module stays as the place other
packages import `stream_tensors` from.)
"""

from __future__ import annotations

import torch


def stream_tensors(value, n_streams: int) -> tuple[torch.Tensor, ...] | None:
    """The residual stream tensors in a block's input or output, or None if there are none.

    A tensor is one stream; a tuple is ResiDual's (x, d) when the block has two streams, else
    a Hugging Face output whose first element is the hidden state.
    """
    if isinstance(value, torch.Tensor):
        return (value,) if n_streams == 1 else None
    if isinstance(value, (tuple, list)) and len(value) >= n_streams:
        head = tuple(value[:n_streams])
        if all(isinstance(t, torch.Tensor) for t in head):
            return head
    return None
