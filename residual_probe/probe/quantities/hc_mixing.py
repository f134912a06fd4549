"""hc_mixing: how the residual mixing of a hyper-connection model behaves, per mixer and step.

Hyper-connection models (Zhu et al. 2024; mHC, Xie et al. 2026; DeepSeek-V4) carry n copies of the
stream, and before each sublayer a learned n x n matrix mixes them: h'_k = sum_j comb[j, k] h_j
(+ the branch output), i.e. the copies' vector is multiplied by A = comb^T. mHC projects comb onto
the doubly stochastic matrices so that products of them over depth stay doubly stochastic, with
gain 1; unconstrained HC's products can grow (the mHC paper's Fig. 3: "Amax gain" in the
thousands). Per recorded step, for each hyper-connection module (`BlockInfo.mixers`, rows with
the module's name as sublayer and stream "-"):

- `hc_ds_error`: mean over tokens of comb's largest violation of double stochasticity, the
  largest of max |row sum - 1|, max |column sum - 1| and the most negative entry's magnitude;
- `hc_gain_fwd` / `hc_gain_bwd`: largest over tokens of the largest absolute row sum (forward
  signal) / column sum (backward gradient) of the product P = A_m ... A_1 of the stack's mixings
  up to this one, in forward order (the mHC paper's "Amax gain magnitude"; 1 is ideal).

comb is read where the module returns it: the (.., n, n) tensor among its outputs, n its
`hc_mult` (transformers' DeepseekV4HyperConnection returns (post, comb, collapsed), and so does
the reference `HyperConnection`). The running product is kept per stack on the device during a
forward and restarts at the stack's first mixer (each micro-batch); the largest over tokens and
forwards is taken on the device and across data-parallel ranks.

Cost: on recorded steps, per mixer a (tokens, n, n) matrix product and a few reductions (n = 4:
tens of floats a token); nothing on other steps, nothing for a model without hyper-connections.
"""

from __future__ import annotations

import math

import torch

from ..hooks import compiler_disable
from .base import Quantity, buffer_dtype, row

METRICS = ("hc_ds_error", "hc_gain_fwd", "hc_gain_bwd")


def mixing_matrix(output, n: int) -> torch.Tensor | None:
    """The (.., n, n) residual mixing matrix among a hyper-connection module's outputs: of the
    tensors ending in (n, n), the one of highest rank (the per-token weights `post`, (B, T, n),
    also end in (n, n) when a sequence has n tokens)."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    found = [
        t
        for t in items
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (n, n)
    ]
    return max(found, key=lambda t: t.dim()) if found else None


def ds_error(comb: torch.Tensor) -> torch.Tensor:
    """Per matrix, its largest violation of double stochasticity (0 for a doubly stochastic one):
    the largest of |row sum - 1|, |column sum - 1| and the most negative entry's magnitude."""
    sums = torch.cat([comb.sum(-1), comb.sum(-2)], dim=-1).sub_(1).abs_().amax(-1)
    return torch.maximum(sums, comb.amin((-2, -1)).neg_().clamp_(min=0))


def gains(product: torch.Tensor) -> torch.Tensor:
    """Largest over the matrices of (largest absolute row sum, largest absolute column sum)."""
    a = product.abs()
    return torch.cat([a.sum(-1), a.sum(-2)], dim=0).amax(-1).view(2, -1).amax(-1)


class HCMixing(Quantity):
    name = "hc_mixing"

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        # one slot per (block, mixer): (block position, mixer name, module, first mixer of its stack)
        self.slots = []
        seen_stacks: set[str] = set()
        for pos, b in enumerate(setup.blocks):
            for name, module in b.mixers.items():
                self.slots.append((pos, name, module, b.stack not in seen_stacks))
                seen_stacks.add(b.stack)
        self._probe = None
        self._handles: list = []
        self._product: dict[str, torch.Tensor] = {}  # stack -> running product of this forward
        self.buf: torch.Tensor | None = None  # (slots, 2): [sum of ds_error, tokens]
        self.top: torch.Tensor | None = None  # (slots, 2): [largest fwd gain, largest bwd gain]
        self._fresh = True

    def begin(self, step):
        super().begin(step)
        self._fresh = True
        self._product = {}

    def attach(self, probe) -> None:
        if self._handles or not self.slots:
            return
        self._probe = probe
        for j, (pos, _, module, first) in enumerate(self.slots):
            hook = compiler_disable(self._hook(j, self.setup.blocks[pos].stack, first))
            self._handles.append(module.register_forward_hook(hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._product = [], {}

    def _hook(self, j: int, stack: str, first: bool):
        def hook(module, args, output) -> None:
            if not self.is_active or not self._probe.records_forward(module):
                return
            comb = mixing_matrix(output, module.hc_mult)
            if comb is None:
                return
            with torch.no_grad():
                m = comb.detach().to(torch.promote_types(comb.dtype, torch.float32))
                m = m.reshape(-1, *m.shape[-2:])  # (tokens, n, n)
                a = m.transpose(-1, -2)  # what multiplies the copies' vector
                prev = self._product.get(stack)
                product = a if first or prev is None or prev.shape != a.shape else a @ prev
                self._product[stack] = product
                buf, top = self._buffers(m.device)
                buf[j, 0].add_(ds_error(m).sum())
                buf[j, 1].add_(m.shape[0])
                torch.maximum(top[j], gains(product).to(top.dtype), out=top[j])

        return hook

    def _buffers(self, device):
        if self.buf is None or (self._fresh and self.buf.device != device):
            dtype = buffer_dtype(device)
            self.buf = torch.zeros(len(self.slots), 2, dtype=dtype, device=device)
            self.top = torch.full((len(self.slots), 2), -math.inf, dtype=dtype, device=device)
        elif self._fresh:
            self.buf.zero_()
            self.top.fill_(-math.inf)
        self._fresh = False
        return self.buf, self.top

    def pooled(self, ctx):
        return None if not self.is_active or self._fresh else self.buf.reshape(-1)

    def maxima(self, ctx):
        return None if not self.is_active or self._fresh else self.top.reshape(-1)

    def values(self, ctx, pooled, maxima=None):
        if pooled is None:
            return None
        sums = pooled.view(-1, 2)
        mean = sums[:, 0] / sums[:, 1]
        return torch.cat([mean[:, None], sums[:, 1:], maxima.view(-1, 2)], dim=1).reshape(-1)

    def rows(self, step, host):
        out = []
        for j, (pos, name, _, _) in enumerate(self.slots):
            err, tokens, fwd, bwd = host[4 * j : 4 * j + 4]
            if tokens <= 0:
                continue
            b = self.setup.blocks[pos]
            for metric, v in zip(METRICS, (err, fwd, bwd)):
                out.append(row(step, b.stack, b.index, name, "-", metric, v))
        return out
