"""Finding the residual blocks of any Transformer, their sublayers and their norm modules.

A *block* is one repeated layer of a stack: residual-probe's `Block`, Hugging Face's
`GPT2Block`, `BertLayer`, `LlamaDecoderLayer`, `T5Block`, `ViTLayer`, torch's
`TransformerEncoderLayer`, fairseq's `encoder.layers.N`. All of them sit in a `ModuleList`
(or `Sequential`) of identical modules, so discovery looks for exactly that:

1. a container (`ModuleList`/`Sequential`) whose children all share one class that holds
   parameters in at least two submodules (so a list of plain `Linear`s is not a stack);
2. named like a stack (`layers`, `layer`, `h`, `block`, `blocks`) or holding a class whose
   name ends in `Block`/`Layer`;
3. outermost: a list nested inside a block (T5's `block.N.layer`) is a sublayer list.

Where this finds nothing, the user names the blocks by a module-path pattern
(`blocks="model.layers.*"`, one `*` per path component).

A block's index is its name in the container when that is an integer, else its position. So a
pipeline stage holding only some blocks keeps their global indices when it keeps their names:
a `ModuleDict` "0".."N-1" with the other blocks deleted (torchtitan's split), or a `ModuleList`
with the other blocks replaced by `nn.Identity` (placeholders are not blocks). A `ModuleList`
whose items were deleted renumbers them: its blocks are indexed from 0 again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError

STACK_NAMES = ("layers", "layer", "h", "block", "blocks")
BLOCK_CLASS = re.compile(r"(block|layer)$", re.IGNORECASE)
NORM_CLASS = re.compile(r"(norm)$", re.IGNORECASE)
NORM_TYPES = tuple(
    t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t
)  # RMSNorm: torch>=2.4


# path components that wrappers insert: DDP / DataParallel (module), FSDP1, activation-checkpoint
# wrappers and torch.compile (_orig_mod). Stripped from names, so rows are the same wrapped or not.
WRAPPER_PARTS = ("module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_path(path: str, model=None) -> str:
    """A module path without wrapper components: "module.transformer.h" -> "transformer.h".

    `module` is dropped only where the module holding it is a wrapper (DDP, DataParallel, or any
    module whose only child is `module`), so a user's own submodule named "module" is kept.
    """
    parts = path.split(".") if path else []
    out, owner = [], model
    for part in parts:
        child = owner.get_submodule(part) if owner is not None else None
        wrapper = part in WRAPPER_PARTS[1:] or (
            part == "module"
            and (owner is None or [n for n, _ in owner.named_children()] == ["module"])
        )
        if not wrapper:
            out.append(part)
        owner = child
    return ".".join(out)


class DiscoveryError(UserError):
    """No blocks could be found (or the user's pattern matched none); one line for the user."""


@dataclass
class BlockInfo:
    """One residual block: where it is, what it holds, and which residual streams it carries."""

    stack: str  # "encoder", "decoder", or the container's module path (e.g. "transformer.h")
    index: int  # 0-based index within its stack (the global one on a pipeline stage; see the module doc)
    name: str  # module path, e.g. "decoder.layers.3"
    module: nn.Module
    sublayers: dict[str, nn.Module] = field(default_factory=dict)  # e.g. self_attn, ffn / attn, mlp
    norms: dict[str, nn.Module] = field(default_factory=dict)  # norm modules inside the block
    streams: tuple[str, ...] = ("x",)  # ResiDual blocks carry ("x", "d")
    # The streams are one tensor (.., n, C) split on dim -2, not a tuple: hyper-connections'
    # n residual copies ("h0".."h{n-1}"), as DeepSeek-V4 and the `hc`/`mhc` placements carry them.
    stacked: bool = False
    # The hyper-connection modules that mix those copies (name -> module), in forward order.
    mixers: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def sublayer_names(self) -> list[str]:
        return list(self.sublayers)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm, GroupNorm and look-alikes (LlamaRMSNorm, T5LayerNorm, ...), and DyT
    whatever its class is called (`squashes`)."""
    return (
        isinstance(module, NORM_TYPES)
        or bool(NORM_CLASS.search(type(module).__name__))
        or squashes(module)
    )


def squashes(module: nn.Module) -> bool:
    """Whether a module is DyT or a look-alike (DynamicTanh, DyTNorm, ...): read from behaviour, not
    its name. A leaf with per-channel parameters of one width d and a scalar (gamma, beta, alpha)
    whose output stays within |gamma| + |beta| however large its input: gamma * tanh(alpha x) +
    beta (Zhu et al. 2025). A per-channel scale (LayerScale) grows with its input and is not one."""
    if next(module.children(), None) is not None:
        return False
    params = list(module.parameters())
    widths = {p.numel() for p in params if p.dim() == 1 and p.numel() > 1}
    if len(widths) != 1 or any(p.dim() > 1 for p in params) or len(params) > 4:
        return False
    (d,) = widths
    if not any(p.numel() == 1 for p in params):
        return False
    x = 1e4 * torch.randn(2, d, generator=torch.Generator().manual_seed(0))
    x = x.to(dtype=params[0].dtype, device=params[0].device)
    try:
        with torch.no_grad():
            y = module(x)
    except Exception:
        return False
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return False
    bound = sum(float(p.detach().abs().max()) for p in params if p.numel() == d)
    return bool(y.abs().max() <= bound * (1 + 1e-5) + 1e-6)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _looks_like_block(module: nn.Module) -> bool:
    """Two or more parametrized parts (sublayers or norms), possibly inside a sublayer list (T5)."""
    return sum(1 for c in module.children() if _has_params(c)) >= 2 or len(_sublayers(module)) >= 2


STACK_TYPES = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def _placeholder(module: nn.Module) -> bool:
    """nn.Identity standing in for a block another pipeline stage holds."""
    return type(module) is nn.Identity


def _members(container: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of a stack container's children, placeholders left out."""
    return [(n, m) for n, m in container.named_children() if not _placeholder(m)]


def _index(name: str, position: int) -> int:
    """A block's index: its name in the container when that is an integer (the global index
    a pipeline stage keeps), else its position."""
    last = name.rpartition(".")[2]
    return int(last) if last.isdecimal() else position


def _is_stack(name: str, container: nn.Module) -> bool:
    children = [m for _, m in _members(container)]
    if not children or len({type(c) for c in children}) != 1:
        return False
    first = children[0]
    if not _looks_like_block(first):
        return False
    return name.rsplit(".", 1)[-1] in STACK_NAMES or bool(BLOCK_CLASS.search(type(first).__name__))


def _outermost(paths: list[str]) -> list[str]:
    """Drop paths that lie inside another path of the list (module order is kept)."""
    return [
        p for p in paths if not any(q != p and (q == "" or p.startswith(q + ".")) for q in paths)
    ]


def _stack_name(path: str, block: nn.Module) -> str:
    for part in path.split("."):
        for role in ("decoder", "encoder"):
            if role in part.lower():
                return role
    for role in ("decoder", "encoder"):
        if role in type(block).__name__.lower():
            return role
    return path or "blocks"


def _sublayers(block: nn.Module) -> dict[str, nn.Module]:
    """The block's children that hold parameters and are not norms; sublayer lists expanded."""
    out: dict[str, nn.Module] = {}
    for name, child in block.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and not _is_stack("", child):
            for sub, grandchild in child.named_children():
                if _has_params(grandchild) and not is_norm(grandchild):
                    out[f"{name}.{sub}"] = grandchild
        elif _has_params(child) and not is_norm(child):
            out[name] = child
    return out


def hyper_connections(block: nn.Module) -> dict[str, nn.Module]:
    """The block's hyper-connection modules: those with an integer `hc_mult`, the number of
    residual copies (DeepSeek-V4's `DeepseekV4HyperConnection` and the reference `HyperConnection`
    name it so), returning the (.., n, n) residual mixing matrix among their outputs."""
    return {
        n: m
        for n, m in block.named_modules()
        if n and isinstance(getattr(m, "hc_mult", None), int) and not isinstance(m.hc_mult, bool)
    }


def _streams(block: nn.Module, mixers: dict[str, nn.Module]) -> tuple[tuple[str, ...], bool]:
    """(stream names, stacked): a block with hyper-connections (`mixers`) carries n copies stacked
    on dim -2; residual-probe's Block says (ResiDual: x, d); any other block one stream x."""
    if mixers:
        n = next(iter(mixers.values())).hc_mult
        return tuple(f"h{i}" for i in range(n)), True
    placement = getattr(block, "placement", None)
    streams = getattr(placement, "streams", None)
    return (tuple(streams), False) if streams else (("x",), False)


def _make(stacks: dict[str, list[tuple[str, nn.Module]]], model: nn.Module) -> list[BlockInfo]:
    """BlockInfo for each (path, module), stacks named by role and made unique, wrappers stripped."""
    clean = {path: clean_path(path, model) for path in stacks}
    names = {path: _stack_name(clean[path], mods[0][1]) for path, mods in stacks.items()}
    if len(set(names.values())) < len(names):  # two stacks with one role: fall back to paths
        names = {path: clean[path] or "blocks" for path in stacks}
    blocks = []
    for path, mods in stacks.items():
        for k, (name, module) in enumerate(mods):
            norms = {n: m for n, m in module.named_modules() if n and is_norm(m)}
            mixers = hyper_connections(module)
            norms = {  # the hyper-connections' own norms read the copies to weigh them
                n: m for n, m in norms.items() if not any(n.startswith(h + ".") for h in mixers)
            }
            sublayers = {n: m for n, m in _sublayers(module).items() if n not in mixers}
            streams, stacked = _streams(module, mixers)
            blocks.append(
                BlockInfo(
                    names[path],
                    _index(name, k),
                    name,
                    module,
                    sublayers,
                    norms,
                    streams,
                    stacked,
                    mixers,
                )
            )
    return blocks


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = [re.escape(p).replace(r"\*", r"[^.]+") for p in pattern.split(".")]
    return re.compile(r"\.".join(parts) + r"\Z")


def find_blocks(model: nn.Module, pattern: str | None = None) -> list[BlockInfo]:
    """The residual blocks of `model`, in module order, grouped into stacks.

    pattern: optional module-path pattern naming the blocks, `*` matching one path component
    (e.g. "model.layers.*", "*.layers.*"); blocks are grouped into stacks by their parent path.
    Raises DiscoveryError saying what was tried when nothing is found.
    """
    named = [(n, m) for n, m in model.named_modules()]
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern.strip():
            raise DiscoveryError(f"block pattern must be a non-empty module path, got {pattern!r}")
        rx = _pattern_regex(pattern.strip())
        hits = _outermost([n for n, _ in named if n and rx.match(n)])
        if not hits:
            sample = ", ".join(n for n, _ in named[1:6])
            raise DiscoveryError(
                f"block pattern {pattern!r} matched no module of {type(model).__name__}; "
                f"module paths look like: {sample}"
            )
        modules = dict(named)
        stacks: dict[str, list[tuple[str, nn.Module]]] = {}
        for n in hits:
            stacks.setdefault(n.rpartition(".")[0], []).append((n, modules[n]))
        return _make(stacks, model)

    containers = [n for n, m in named if isinstance(m, STACK_TYPES) and _is_stack(n, m)]
    containers = _outermost(containers)
    if not containers:
        raise DiscoveryError(
            f"no residual blocks found in {type(model).__name__}: looked for a ModuleList/Sequential of "
            f"identical multi-sublayer modules named {'/'.join(STACK_NAMES)} or of a class ending in "
            "Block/Layer; name them with a module-path pattern, e.g. blocks='model.layers.*'"
        )
    modules = dict(named)
    prefix = lambda path: f"{path}." if path else ""  # noqa: E731
    return _make(
        {path: [(prefix(path) + n, m) for n, m in _members(modules[path])] for path in containers},
        model,
    )
