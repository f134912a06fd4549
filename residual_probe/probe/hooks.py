"""The probe's forward-hook plumbing: one stable hook object per block, registered and removed
together, the claim that keeps a second probe off the same blocks, and the checks that decide
whether a forward counts (not during a backward's recomputation; hooks eager under
torch.compile). What a hook records is the Probe's and its quantities' business."""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch
from torch import nn

from .discovery import BlockInfo
from .errors import ProbeError

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Any]" = (
    weakref.WeakKeyDictionary()
)  # block -> probe (weakref)


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. activation-checkpoint recomputation)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def compiler_disable(fn):
    """Hooks run eagerly under torch.compile: a graph break at each block, no per-block recompiles."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def compiled_modules(model: nn.Module) -> list[str]:
    """Paths of the torch.compile'd modules inside `model` ("(the model)" for the model itself)."""
    frame = sys.modules.get(
        "torch._dynamo.eval_frame"
    )  # not imported: nothing is compiled (and importing costs ~1 s)
    OptimizedModule = getattr(frame, "OptimizedModule", None)
    if OptimizedModule is None:
        return []
    return [n or "(the model)" for n, m in model.named_modules() if isinstance(m, OptimizedModule)]


class _ForwardHook:
    """The forward hook of block `pos`: one stable object per block, so re-attaching (also under
    torch.compile, which keeps calling the hook objects it traced) never stacks two."""

    def __init__(self, probe, pos: int):
        self.probe = weakref.ref(probe)
        self.pos = pos

    def __call__(self, module, args, kwargs, output):
        probe = self.probe()
        if probe is not None and probe._attached:
            probe._on_forward(self.pos, module, args, kwargs, output)


class BlockHooks:
    """The forward hooks of `probe` on its blocks (each calls `probe._on_forward(pos, module,
    args, kwargs, output)` while the probe is attached) and its claim on the blocks."""

    def __init__(self, probe, blocks: list[BlockInfo]):
        self.blocks = blocks
        self._owner = weakref.ref(probe)
        self._fns = [compiler_disable(_ForwardHook(probe, pos)) for pos in range(len(blocks))]
        self._handles: list = []

    def attach(self, forward: bool) -> None:
        """Claim the blocks (refused while another probe holds one) and, if `forward` (a forward
        quantity is scheduled at all), register one forward hook per block."""
        owner = self._owner()
        for b in self.blocks:
            other = _ATTACHED.get(b.module)
            if other is not None and other() is not None and other() is not owner:
                raise ProbeError(
                    f"another Probe is attached to block {b.name}: detach it first (two probes would "
                    "stack hooks and each count every forward); one probe records every quantity"
                )
        if forward:
            for b, fn in zip(self.blocks, self._fns):
                self._handles.append(b.module.register_forward_hook(fn, with_kwargs=True))
        for b in self.blocks:
            _ATTACHED[b.module] = self._owner

    def detach(self) -> None:
        """Remove every hook and release the blocks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        owner = self._owner()
        for b in self.blocks:
            if _ATTACHED.get(b.module) is not None and _ATTACHED[b.module]() is owner:
                del _ATTACHED[b.module]
