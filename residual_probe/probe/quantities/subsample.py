"""subsample: a seeded draw of `subsample_tokens` token positions of every layer's residual stream.

From the first training forward of each scheduled step, the same positions in every layer of a
stack (row 0 the input of block 0, i.e. the embedding output; row k + 1 block k's output), kept
as float32 on the activations' device for the pairwise metrics (similarity, CKA, effective
rank). The positions are drawn on that device with a seeded generator, so no index tensor is
copied to the device inside a hook. Memory: (blocks + 1) x tokens x d per stream, twice (the
last complete draw, and the one being filled), allocated once and reused: a fresh 12.8 MB
buffer each step costs more in first-touch page faults than the copies into it.
"""

from __future__ import annotations

import torch

from .base import Quantity


def _take(t: torch.Tensor, pick: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = the picked token rows of t (every row when `pick` is None), as float32: one kernel,
    a copy (2.5x faster than index_select in situ) when every row is taken."""
    flat = t.detach().reshape(-1, t.shape[-1])
    if pick is None:
        out.copy_(flat)
    elif flat.dtype == out.dtype:
        torch.index_select(flat, 0, pick, out=out)
    else:
        out.copy_(flat.index_select(0, pick))


class Subsample(Quantity):
    name = "subsample"
    sparse = True
    uses_forward = True

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self.stack_len: dict[str, int] = {}
        for b in setup.blocks:
            self.stack_len[b.stack] = max(self.stack_len.get(b.stack, 0), b.index + 1)
        self._gens: dict[torch.device, torch.Generator] = {}
        self._state: dict[str, dict] = {}
        self.last: dict[tuple[str, str], torch.Tensor] = {}
        self._spare: dict[str, dict[str, torch.Tensor]] = {}  # stack -> stream -> a buffer to reuse
        self.last_step: int | None = None
        self._step = 0

    def begin(self, step):
        super().begin(step)
        self._state = {}
        self._step = step

    def detach(self):
        self._state = {}

    def _pick(self, n_tok: int, device: torch.device) -> torch.Tensor | None:
        """The sorted positions to keep; None when every token is kept (no draw, no index)."""
        if n_tok <= self.setup.subsample_tokens:
            return None
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device)
        gen.manual_seed(self.setup.seed * 1_000_003 + self._step * 101 + len(self._state))
        return (
            torch.randperm(n_tok, generator=gen, device=device)[: self.setup.subsample_tokens]
            .sort()
            .values
        )

    def forward(self, pos, block, ins, outs):
        if ins is None:
            return
        d = outs[0].shape[-1]
        n_tok = outs[0].numel() // d
        state = self._state.get(block.stack)
        if block.index == 0 and state is None:
            pick = self._pick(n_tok, outs[0].device)
            layers = self.stack_len[block.stack] + 1
            kept = n_tok if pick is None else len(pick)
            state = {
                "pick": pick,
                "n": n_tok,
                "filled": [False] * layers,
                "rows": self._rows(block.stack, block.streams, (layers, kept, d), outs[0].device),
            }
            for s, t in zip(block.streams, ins):
                _take(t, pick, state["rows"][s][0])
            state["filled"][0] = True
            self._state[block.stack] = state
        if state is None or state["n"] != n_tok or state["filled"][block.index + 1]:
            return
        for s, t in zip(block.streams, outs):
            _take(t, state["pick"], state["rows"][s][block.index + 1])
        state["filled"][block.index + 1] = True

    def _rows(
        self, stack: str, streams, shape: tuple, device: torch.device
    ) -> dict[str, torch.Tensor]:
        spare = self._spare.pop(stack, {})
        return {
            s: spare[s]
            if s in spare and spare[s].shape == shape and spare[s].device == device
            else torch.empty(shape, device=device)
            for s in streams
        }

    def values(self, ctx, pooled, maxima=None):
        if not self.is_active:
            return None
        out = {}
        for stack, state in self._state.items():
            if all(state["filled"]):
                for stream, H in state["rows"].items():
                    out[(stack, stream)] = H
            else:
                self._spare[stack] = state["rows"]
        if out:
            for (
                stack,
                stream,
            ), H in self.last.items():  # the previous draw's buffers are filled next
                self._spare.setdefault(stack, {})[stream] = H
            self.last, self.last_step = out, ctx.step
        self._state = {}
        return None
