"""The parameter plan: which parameters form each block, sublayer, parameter group and W2.

Planned once when the probe is made. Parameters are kept as (owner module, attribute) and
re-read at each step, because FSDP swaps parameter objects. The per-parameter squared gradient
norms of a step are computed once (`grad_squares`) and shared by every quantity that reads
`.grad` (param_grad_norm, w2_grad_norm).

W2, the FFN output projection of Xiong et al.'s Theorem 1, is chosen by name per family
(W2_NAMES), never as "the last FFN matrix": in a mixture-of-experts block that would be an
expert's up-projection. Several candidates (one per expert) or none are reported, not guessed.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .discovery import BlockInfo, clean_path, is_norm
from .errors import ProbeError
from .gradnorm import GroupNorms, SquaredNorms


def current(refs: list[tuple[nn.Module, str]]) -> list[torch.Tensor]:
    """The parameters (owner module, attribute name) as they are now: FSDP swaps parameter objects,
    so they are re-read at each step. Looked up in the owner's `_parameters` (nn.Module.__getattr__
    costs ~1 us a name, 3 ms a step at 771 parameters), by attribute where the name is no longer a
    registered parameter."""
    return [m._parameters[a] if a in m._parameters else getattr(m, a) for m, a in refs]


PARAM_GROUPS = ("attention", "ffn", "norm", "other")
# the parts of a model outside its blocks, as param_grad_norm rows (stack "model", layer -1), then "total"
PARTS = ("embedding", "embedding_norm", "final_norm", "head", "other")
HEAD_NAMES = (
    "lm_head",
    "output_projection",
    "embed_out",
    "head",
    "classifier",
    "cls",
    "output",
    "qa_outputs",
)


def is_embedding_norm(path: str) -> bool:
    """A norm outside the blocks that normalizes the embedding, by name: "emb" in its own name or
    its parent's (`embeddings.LayerNorm`, `layernorm_embedding`, `embed_norm`)."""
    return any("emb" in part.lower() for part in path.split(".")[-2:])


class Parts:
    """The parameters outside the blocks, by part, for the whole-model rows of param_grad_norm.

    embedding: nn.Embedding parameters (token and position); embedding_norm: norm modules outside
    the blocks named for the embedding (`is_embedding_norm`: BERT's `embeddings.LayerNorm`, BART's
    `layernorm_embedding`, BLOOM's `word_embeddings_layernorm`, our Peri-LN's `embed_norm`): a
    Post-LN BERT has no final norm; final_norm: the other norm modules outside the blocks; head:
    the output projection (HEAD_NAMES) when its weight is its own tensor (a head tied to the
    embedding is that tensor, counted once: `tied_head` says so); other: the rest. Every
    parameter is counted once (`model.parameters()` order, as torch.nn.utils.clip_grad_norm_ sees
    them), so the total over blocks and parts is clip_grad_norm_'s norm.
    """

    def __init__(self, model: nn.Module, block_ids: set[int]):
        named = dict(model.named_modules())
        owner = {}
        for mpath, mod in named.items():
            for attr, p in mod.named_parameters(recurse=False):
                owner.setdefault(id(p), (mpath, mod, attr))
        head_ids = {
            id(p)
            for mpath, mod in named.items()
            if mpath.rpartition(".")[2] in HEAD_NAMES
            for p in mod.parameters(recurse=False)
        }
        embed_ids = {
            id(p)
            for mod in named.values()
            if isinstance(mod, nn.Embedding)
            for p in mod.parameters(recurse=False)
        }
        self.refs: list[tuple[nn.Module, str]] = []
        self.names: list[str] = []
        members: dict[str, list[int]] = {part: [] for part in PARTS}
        self.tied_head = False
        for (
            name,
            p,
        ) in model.named_parameters():  # each tensor once: a tied weight under its first name
            if id(p) in block_ids:
                continue
            mpath, mod, attr = owner[id(p)]
            part = (
                "embedding"
                if id(p) in embed_ids
                else "head"
                if id(p) in head_ids
                else ("embedding_norm" if is_embedding_norm(mpath) else "final_norm")
                if is_norm(mod)
                else "other"
            )
            self.tied_head |= id(p) in embed_ids and id(p) in head_ids
            members[part].append(len(self.refs))
            self.refs.append((mod, attr))
            mod_path = clean_path(
                name.rpartition(".")[0], model
            )  # the name without wrapper prefixes
            self.names.append(f"{mod_path}.{attr}" if mod_path else attr)
        self.keys = [part for part in PARTS if members[part]]
        self.groups = GroupNorms(len(self.refs), [members[part] for part in self.keys])
        self._squares = SquaredNorms()

    def _missing(self, grads: list) -> tuple[bool, ...]:
        return tuple(all(grads[i] is None for i in group) for group in self.groups.groups)

    def grad_squares(self, sums=None) -> tuple[torch.Tensor, tuple[bool, ...]]:
        """(squared norm of each part parameter's .grad, which parts have no .grad at all); `sums`:
        gradnorm.RankSums of the probe step (sharded squares complete after its all-reduce)."""
        grads = [p.grad for p in current(self.refs)]
        return self._squares(grads, sums), self._missing(grads)

    def without_grad(self) -> dict[str, list[str]]:
        """{part: its parameter names} of the parts none of whose parameters has a `.grad` now: after
        a backward with every parameter requiring grad, the parts the loss does not reach (BERT's
        pooler under a loss on the token states)."""
        grads = [p.grad for p in current(self.refs)]
        return {
            part: [self.names[i] for i in group]
            for part, group, gone in zip(self.keys, self.groups.groups, self._missing(grads))
            if gone
        }


# the FFN output projection, by family: ours / OPT / fairseq (fc2), GPT-2 (mlp.c_proj), Llama /
# Mistral / Qwen2 (down_proj), T5 (wo), Mixtral-style experts (w2), GPT-NeoX / Falcon / BLOOM
# (dense_4h_to_h), torch.nn.Transformer*Layer (linear2), BERT / RoBERTa / ViT (output.dense)
W2_NAMES = ("fc2", "c_proj", "down_proj", "wo", "w2", "dense_4h_to_h", "linear2", "fc_out")
W2_PATHS = (re.compile(r"(^|\.)output\.dense$"),)
ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


def param_group(name: str, module_of: dict[str, nn.Module], sublayers: Iterable[str]) -> str:
    """attention / ffn / norm / other for a parameter path inside a block."""
    owner = name.rpartition(".")[0]
    if owner in module_of and is_norm(module_of[owner]):
        return "norm"
    if any(ATTENTION.search(part) for part in name.split(".")[:-1]):
        return "attention"
    if any(name.startswith(s + ".") for s in sublayers):
        return "ffn"
    return "other"


def w2_candidates(block: BlockInfo) -> list[str]:
    """Paths (inside the block) of FFN output-projection weights, by the family names above."""
    module_of = dict(block.module.named_modules())
    out = []
    for name, p in block.module.named_parameters():
        owner, _, attr = name.rpartition(".")
        if (
            attr != "weight"
            or p.dim() != 2
            or param_group(name, module_of, block.sublayers) != "ffn"
        ):
            continue
        if owner.rpartition(".")[2] in W2_NAMES or any(rx.search(owner) for rx in W2_PATHS):
            out.append(owner)
    return out


@dataclass
class W2:
    stack: str
    pos: int  # position of the block in the probe's block list
    path: str  # module path inside the block, e.g. "mlp.c_proj"
    ref: int  # index into ParamPlan.refs


class ParamPlan:
    """Parameters per block / sublayer / parameter group, and each stack's W2, planned once.

    keys[g] = (block position, sublayer label) of group g, the label being "block", a sublayer
    name, or "group:<attention|ffn|norm|other>".
    w2: module path inside the last block of every stack (None: by W2_NAMES), and whether a
    missing or ambiguous W2 is an error (True when the user asked for w2_grad_norm).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: list[BlockInfo],
        w2: str | None = None,
        strict_w2: bool = False,
        want_w2: bool = True,
    ):
        self.model = model
        self.refs: list[tuple[nn.Module, str]] = []
        index: dict[int, int] = {}
        groups: list[list[int]] = []
        self.keys: list[tuple[int, str]] = []

        def idx(module: nn.Module) -> list[int]:
            out = []
            for name, p in module.named_parameters():
                if id(p) not in index:
                    owner_path, _, attr = name.rpartition(".")
                    index[id(p)] = len(self.refs)
                    self.refs.append(
                        (module.get_submodule(owner_path) if owner_path else module, attr)
                    )
                out.append(index[id(p)])
            return list(dict.fromkeys(out))

        for pos, b in enumerate(blocks):
            self.keys.append((pos, "block"))
            groups.append(idx(b.module))
            for sub, mod in b.sublayers.items():
                self.keys.append((pos, sub))
                groups.append(idx(mod))
            module_of = dict(b.module.named_modules())
            by_group: dict[str, list[int]] = {}
            for name, p in b.module.named_parameters():
                by_group.setdefault(param_group(name, module_of, b.sublayers), []).append(
                    index[id(p)]
                )
            for g in PARAM_GROUPS:
                if g in by_group:
                    self.keys.append((pos, f"group:{g}"))
                    groups.append(list(dict.fromkeys(by_group[g])))
        self.groups = GroupNorms(len(self.refs), groups)
        self.parts = Parts(model, {id(p) for p in self.tensors()})
        self.w2 = (
            self._plan_w2(blocks, w2, strict_w2, index) if want_w2 else []
        )  # not asked for: no search, no warning
        self._squares = SquaredNorms()
        self._missing_key = None
        self._missing: tuple[bool, ...] = ()

    def _plan_w2(self, blocks, w2, strict, index) -> list[W2]:
        last = {}
        for pos, b in enumerate(blocks):
            last[b.stack] = pos
        out = []
        for stack, pos in last.items():
            b = blocks[pos]
            if w2 is not None:
                try:
                    weight = b.module.get_submodule(w2).weight
                except AttributeError:
                    raise ProbeError(
                        f"w2={w2!r}: block {b.name} has no module {w2!r} with a weight"
                    ) from None
                paths = [w2]
            else:
                paths = w2_candidates(b)
                if len(paths) != 1:
                    what = (
                        f"several FFN output projections ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}"
                        "; a mixture of experts?)"
                        if paths
                        else f"no FFN output projection named {'/'.join(W2_NAMES)} or output.dense"
                    )
                    if not strict:  # asked for by default, not by name: skipped, and said
                        warnings.warn(
                            f"probe: w2_grad_norm skipped: block {b.name} has {what}; name it with "
                            "w2='<path in the block>'",
                            stacklevel=4,
                        )
                        continue
                    raise ProbeError(
                        f"w2_grad_norm: block {b.name} has {what}; name one with w2='<path in the block>' "
                        "or leave w2_grad_norm out of quantities"
                    )
                weight = b.module.get_submodule(paths[0]).weight
            out.append(W2(stack, pos, paths[0], index[id(weight)]))
        return out

    def tensors(self, refs: list[int] | None = None) -> list[torch.Tensor]:
        """The parameters as they are now (`current`), all or those at indices `refs`."""
        return current(self.refs if refs is None else [self.refs[i] for i in refs])

    def grads(self, refs: list[int] | None = None) -> list[torch.Tensor | None]:
        """The `.grad` of every parameter (or of those at indices `refs`)."""
        return [p.grad for p in self.tensors(refs)]

    def grad_squares(self, sums=None) -> tuple[torch.Tensor, tuple[bool, ...]]:
        """(squared norm of every parameter's .grad, which groups have no .grad at all); `sums`:
        gradnorm.RankSums of the probe step (sharded squares complete after its all-reduce)."""
        grads = self.grads()
        sq = self._squares(grads, sums)
        key = self._squares._key
        if key != self._missing_key:  # recomputed only when which grads exist changes
            present = [g is not None for g in grads]
            self._missing = tuple(
                not any(present[i] for i in group) for group in self.groups.groups
            )
            self._missing_key = key
        return sq, self._missing

    @property
    def plans_built(self) -> int:
        return self._squares.plans_built + self.groups._squares.plans_built
