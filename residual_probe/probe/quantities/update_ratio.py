"""update_ratio: ||Δθ|| / ||θ|| of each block, sublayer and parameter group across one optimizer step.

The update-to-weight ratio behind the ResiDual paper's Adam argument (and a standard training
health signal: around 1e-3 per step is typical for Adam at a sane learning rate). θ is the
weight before the step, Δθ = θ_after - θ_before.

Taken around `optimizer.step()` by the optimizer's own step hooks (register_step_pre_hook /
register_step_post_hook), registered by the probe on `optimizer=` (or `probe.track_optimizer`).
The pre-hook copies the blocks' parameters into a buffer that is allocated once and reused
(`torch._foreach_copy_`; nothing is allocated per step); the post-hook subtracts in place
(`torch._foreach_sub_`) and norms both with one `_foreach_norm` per dtype/device bucket. Only
on scheduled steps; between them no copy is made. Memory: one copy of the blocks' parameters,
held from the first scheduled step (drop it with `probe.detach()`).

Which step: the update made by the first optimizer step after `probe.step()` closed step s is
recorded at step s (so in the usual loop, backward -> probe.step() -> clip -> optimizer.step(),
it is the update made from step s's gradient); its rows are exported by the next probe.step().
A step the GradScaler skips (inf/NaN gradients) makes no update and records nothing.
"""

from __future__ import annotations

import warnings

import torch

from ..gradnorm import SquaredNorms
from .base import Quantity, row


class UpdateRatio(Quantity):
    name = "update_ratio"
    default = False  # needs an optimizer's step: asked for by name

    def __init__(self, setup, rule):
        super().__init__(setup, rule)
        self._handles: list = []
        self._snap: list[torch.Tensor] | None = None
        self._old_sq = SquaredNorms()
        self._delta_sq = SquaredNorms()
        self._taking: int | None = None  # label of the update being measured
        self._theta_sq: torch.Tensor | None = None
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._probe = None
        self._said = False

    # ---- optimizer hooks ------------------------------------------------------------------

    def attach(self, probe) -> None:
        self._probe = probe
        opt = probe.optimizer
        if opt is not None and not self._handles:
            self._handles = [
                opt.register_step_pre_hook(self._before),
                opt.register_step_post_hook(self._after),
            ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._taking = None
        self._snap = None  # the buffer goes with the hooks

    def _label(self) -> int | None:
        probe = self._probe
        label = probe.current_step - 1
        if label < probe.start_step:
            if not self._said:
                self._said = True
                warnings.warn(
                    "probe: optimizer.step() ran before the first probe.step(); update_ratio is recorded "
                    "for updates after probe.step() (call it after backward, before optimizer.step())",
                    stacklevel=4,
                )
            return None
        return label if self.rule(label) else None

    def _before(self, optimizer, args, kwargs) -> None:
        self._taking = self._label()
        if self._taking is None:
            return
        with torch.no_grad():
            params = [p.detach() for p in self.setup.params.tensors()]
            if self._snap is None or any(
                s.shape != p.shape or s.dtype != p.dtype or s.device != p.device
                for s, p in zip(self._snap, params)
            ):
                self._snap = [torch.empty_like(p) for p in params]
            torch._foreach_copy_(self._snap, params)
            self._theta_sq = self._old_sq(params)

    def _after(self, optimizer, args, kwargs) -> None:
        label, self._taking = self._taking, None
        if label is None or self._snap is None:
            return
        with torch.no_grad():
            params = [p.detach() for p in self.setup.params.tensors()]
            torch._foreach_sub_(self._snap, params)  # snap = θ_before - θ_after = -Δθ
            groups = self.setup.params.groups
            delta = groups.sum_squares(self._delta_sq(self._snap)).sqrt()
            theta = groups.sum_squares(self._theta_sq).sqrt()
            self._pending = [(s, v) for s, v in self._pending if s != label] + [
                (label, delta / theta)
            ]

    # ---- export ---------------------------------------------------------------------------

    def values(self, ctx, pooled, maxima=None):
        if not self._pending:
            return None
        self._exporting, self._pending = self._pending, []
        device = self._exporting[0][1].device
        return torch.cat([v.to(device) for _, v in self._exporting])

    def rows(self, step, host):
        n = len(self.setup.params.keys)
        out = []
        for i, (label, _) in enumerate(self._exporting):
            for (pos, sub), v in zip(self.setup.params.keys, host[i * n : (i + 1) * n]):
                b = self.setup.blocks[pos]
                out.append(row(label, b.stack, b.index, sub, "-", self.name, v))
        return out

    _exporting: list = []
