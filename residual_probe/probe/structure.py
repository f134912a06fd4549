"""Which norm placement a model uses, read from what its blocks do, not from its class names.

One small forward with hooks on every block, on every norm inside a block, on the attention
modules and sublayers of each block, on its hyper-connection modules and on the norms outside the
blocks. Each norm call inside a block is one of three things, decided by what the norm receives
and where it runs, never by its name:
- a *stream norm*: its input is at the stream's width d (the block output's last dimension) and
  it runs outside the attention's forward;
- an *attention internal*: it runs inside an attention module's forward (the attention modules
  of `probe.quantities.attention_sources`): q/k/v norms, per head (Qwen 3, Gemma 3, ours) or
  over the full width (OLMo 2), DeepSeek's low-rank q/kv norms. Reported as QK-norm;
- *off the stream*: any other width outside an attention the probe knows (a custom attention's
  per-head norms). Named in the detail, not used. (Hyper-connections' own norms, which read the
  n copies flattened to weigh them, are left out of `BlockInfo.norms` by discovery.)
Then per block, from its stream input x, its output y, its stream norms' (input, output) and its
sublayers' outputs (the branches), a kind:
- residual: the block carries two streams (ResiDual's x, d): x leaves through a norm, d does not;
- post-ln: y *is* a norm's output (the stream is normalized after the sum; DeepNorm's alpha*x
  and B2T's extra skip sit inside that norm's input and are not told apart);
- sandwich: a norm reads x unchanged *and* y = x + the outputs of some norms (each sublayer's
  output normalized before it joins the stream: Gemma 2/3, CogView);
- res-post-ln: y = x + normalized sublayer outputs, but no norm reads x (OLMo 2's
  x + LN(F(x)), Swin v2's "res-post-norm"): the stream itself is never normalized;
- pre-ln: a norm reads x unchanged, and the branch outputs join the stream as they are (LNS's
  1/sqrt(k) scaling is inside the branch and counts as pre-ln);
- hybridnorm: no norm reads x, a norm reads x + (attention's output) and y = that norm's output
  + a branch output (Zhuo et al. 2025: y = x + Attn(x); x <- LN(y) + FFN(LN(y))), with q/k/v
  normed inside the attention;
- ngpt: no norm module on the stream, but the block's input and output are unit vectors, every
  token (the normalized Transformer: h <- l2(h + alpha (l2(F(h)) - h)), Loshchilov et al. 2024);
- no-norm: the block has no norm on its stream (ReZero; QK-norms do not count);
- hyper-connections (n=N) / mhc: the block holds hyper-connection modules (`BlockInfo.mixers`:
  an integer `hc_mult`, DeepSeek-V4's `attn_hc` / `ffn_hc`): N residual copies mixed by the
  [.., N, N] matrix each module returns (`hc_mixing.mixing_matrix`). mhc (Xie et al. 2026) when every such matrix is doubly stochastic: rows and
  columns sum to 1 within DS_TOL, no entry below -DS_TOL, and not all of them permutations (an
  identity H_res, HC's initialization, is doubly stochastic too and says nothing);
- other: none of these, with the reason in words.
Per stack: one kind, or "mix-ln" for post-ln blocks followed by pre-ln blocks (Mix-LN), or
"hybridnorm-star" for a pre-ln first block followed by hybridnorm blocks (HybridNorm*), or
"other" with the reason (the per-block runs); "peri-ln" is a sandwich stack whose first block
reads the output of a norm outside the blocks (the embedding's LN). The norm type (layernorm /
rmsnorm / dyt) of the stream norms is read from behaviour: LayerNorm ignores a constant shift of
its input, RMSNorm does not, DyT squashes any input into a bounded range; a Pre-LN stack whose
norms are all DyT is labelled "dyt" (Zhu et al. 2025).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from .discovery import BlockInfo, is_norm, squashes
from .stats import stream_tensors

KINDS = (
    "post-ln",
    "pre-ln",
    "residual",
    "sandwich",
    "res-post-ln",
    "hybridnorm",
    "ngpt",
    "no-norm",
    "mhc",
    "hyper-connections (n=N)",
    "other",
)  # a stack adds "mix-ln", "hybridnorm-star" and "peri-ln"; a Pre-LN stack of DyT norms, "dyt"
MAX_SUBSET_NORMS = 8  # tensors per block searched for y = x + a sum of some of them (2^8 sums)
# A mixing matrix is doubly stochastic when |row sum - 1| and |column sum - 1| are at most DS_TOL
# and no entry is below -DS_TOL: 20 Sinkhorn rounds in float32 leave about 1e-6 (DeepSeek-V4 at
# init), a bfloat16 comb's rounding moves a row sum by up to about 2e-3; unconstrained HC's
# learned mixing is off by 0.1 and more (tests/test_hyper_connections.py)
DS_TOL = 1e-2


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.detach().abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(scale, 1.0)))


def _sums_to(base: torch.Tensor, target: torch.Tensor, parts: list[torch.Tensor]) -> bool:
    """True when target = base + (a non-empty sum, in forward order, of some of `parts`)."""
    parts = [p for p in parts if p.shape == target.shape][:MAX_SUBSET_NORMS]
    for r in range(1, len(parts) + 1):
        for subset in itertools.combinations(parts, r):
            s = base
            for p in subset:
                s = s + p
            if _close(s, target):
                return True
    return False


def _on_sphere(t: torch.Tensor) -> bool:
    """Every token of the stream has unit L2 norm (nGPT normalizes as a function, not a module)."""
    n = t.detach().double().norm(dim=-1)
    return bool(torch.allclose(n, torch.ones_like(n), rtol=0, atol=1e-4))


def classify(
    ins: tuple,
    outs: tuple,
    norm_calls: list[tuple[torch.Tensor, torch.Tensor]],
    branches: list[torch.Tensor] = (),
    qk: bool = False,
) -> tuple[str, str | None]:
    """One block's (kind, reason the kind is "other", else None) from its stream input(s) and
    output(s), the (input, output) of its stream norms, its sublayers' outputs (`branches`) and
    whether attention normalizes q/k/v inside (`qk`)."""
    normed = lambda t: any(_close(t, o) for _, o in norm_calls)  # noqa: E731
    if len(outs) == 2:
        if normed(outs[0]) and not normed(outs[1]):
            return "residual", None
        return "other", "two streams, but not ResiDual's (x leaving through a norm, d not)"
    x, y = ins[0], outs[0]
    if not norm_calls:
        return ("ngpt" if _on_sphere(x) and _on_sphere(y) else "no-norm"), None
    if normed(y):
        return "post-ln", None
    reads = any(_close(i, x) for i, _ in norm_calls)
    adds = _sums_to(x, y, [o for _, o in norm_calls])
    if reads:
        return ("sandwich" if adds else "pre-ln"), None
    if adds:
        return "res-post-ln", None
    branches = list(branches)
    if any(_sums_to(x, i, branches) and _sums_to(o, y, branches) for i, o in norm_calls):
        if qk:
            return "hybridnorm", None
        return "other", (
            "HybridNorm's FFN (x <- LN(y) + FFN(LN(y)) after an attention with no norm before "
            "it), but no q/k/v norms inside the attention"
        )
    return "other", (
        "its stream norms neither read the block input nor give its output, and the output is "
        "not the input plus normalized branch outputs"
    )


def doubly_stochastic(comb: torch.Tensor, tol: float = DS_TOL) -> bool:
    """Every [.., n, n] matrix of `comb` has rows and columns summing to 1 within `tol` and no
    entry below -tol (`hc_mixing.ds_error`, the probe's own measure of the violation)."""
    from .quantities.hc_mixing import ds_error

    return bool(ds_error(comb.detach().double()).max() <= tol)


def _permutations(comb: torch.Tensor, tol: float = DS_TOL) -> bool:
    """Every entry within `tol` of 0 or 1: identity or permuting mixes (HC's initialization)."""
    m = comb.detach().double()
    return bool(torch.minimum(m.abs(), (m - 1).abs()).max() <= tol)


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
    if kinds[0] == "pre-ln" and set(kinds[1:]) == {"hybridnorm"}:
        return "hybridnorm-star"
    return "other"


def _stack_reason(kinds: list[str], reasons: list[str | None]) -> str:
    """Why a stack is "other": its blocks' own reasons, or that its blocks differ."""
    why = list(dict.fromkeys(r for r in reasons if r))
    if len(set(kinds)) == 1:
        return "; ".join(why)
    return "blocks of different kinds (" + _runs(kinds) + ")" + "".join(f"; {r}" for r in why)


@dataclass(eq=False)  # compared by identity
class NormCall:
    name: str  # path inside the block
    input: torch.Tensor
    output: torch.Tensor
    in_attention: bool  # ran inside an attention module's forward


class StructureWatch:
    """Hooks that classify each block the first time it runs (`classify`), and the stack's
    placement from those kinds (`result`). Each block is classified inside its own hook and its
    tensors dropped there, so watching a training forward holds no activations past it."""

    def __init__(self, blocks: list[BlockInfo], model: nn.Module | None = None):
        from .quantities.attention_sources import attention_modules

        self.blocks = blocks
        self.seen: dict[int, dict] = {pos: self._fresh() for pos in range(len(blocks))}
        self.outside: list[torch.Tensor] = []
        self.handles = []
        self.in_attention = [0] * len(blocks)  # attention forwards running, per block
        in_blocks = {id(m) for b in blocks for m in b.module.modules()}
        for pos, b in enumerate(blocks):
            hook = self.handles.append
            hook(b.module.register_forward_hook(partial(self._on_block, pos), with_kwargs=True))
            for name, norm in b.norms.items():
                hook(norm.register_forward_hook(partial(self._on_norm, pos, name)))
            for _, attn, _ in attention_modules(b.module):
                hook(attn.register_forward_pre_hook(partial(self._enter, pos)))
                hook(attn.register_forward_hook(partial(self._leave, pos), always_call=True))
            for sub in b.sublayers.values():
                hook(sub.register_forward_hook(partial(self._on_branch, pos)))
            for name, mixer in b.mixers.items():
                hook(mixer.register_forward_hook(partial(self._on_mixer, pos, name)))
        if model is not None:  # the norms outside the blocks, for Peri-LN's embedding LN
            for m in model.modules():
                if (
                    id(m) not in in_blocks
                    and is_norm(m)
                    and not any(is_norm(c) for c in m.children())
                ):
                    self.handles.append(m.register_forward_hook(self._on_outside))

    @staticmethod
    def _fresh() -> dict:
        return {"norms": [], "branches": [], "mixers": {}}

    def _enter(self, pos, module, args):
        self.in_attention[pos] += 1

    def _leave(self, pos, module, args, output):
        self.in_attention[pos] = max(0, self.in_attention[pos] - 1)

    def _on_norm(self, pos, name, module, args, output):
        if "kind" not in self.seen[pos] and args and isinstance(args[0], torch.Tensor):
            if isinstance(output, torch.Tensor):
                call = NormCall(name, args[0].detach(), output.detach(), self.in_attention[pos] > 0)
                self.seen[pos]["norms"].append(call)

    def _on_branch(self, pos, module, args, output):
        first = output[0] if isinstance(output, (tuple, list)) and output else output
        if "kind" not in self.seen[pos] and isinstance(first, torch.Tensor):
            self.seen[pos]["branches"].append(first.detach())

    def _on_mixer(self, pos, name, module, args, output):
        from .quantities.hc_mixing import ds_error, mixing_matrix

        if "kind" in self.seen[pos]:
            return
        comb = mixing_matrix(output, module.hc_mult)
        call = {"n": module.hc_mult, "matrix": comb is not None}
        if comb is not None:
            call.update(
                doubly_stochastic=doubly_stochastic(comb),
                permutation=_permutations(comb),
                error=float(ds_error(comb.detach().double()).max()),
            )
        self.seen[pos]["mixers"].setdefault(name, []).append(call)

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
            seen.update(self._fresh())
            return
        width = outs[0].shape[-1]
        calls = seen.pop("norms")
        stream = [c for c in calls if not c.in_attention and c.input.shape[-1] == width]
        seen["stream_norms"] = list(dict.fromkeys(c.name for c in stream))
        seen["attention_norms"] = list(dict.fromkeys(c.name for c in calls if c.in_attention))
        seen["off_stream"] = {
            c.name: c.input.shape[-1] for c in calls if not c.in_attention and c not in stream
        }
        branches = seen.pop("branches")
        if seen["mixers"]:
            seen["kind"], seen["reason"] = _mixing_kind(seen["mixers"])
        else:
            seen["kind"], seen["reason"] = classify(
                ins,
                outs,
                [(c.input, c.output) for c in stream],
                branches,
                qk=bool(seen["attention_norms"]),
            )
        seen["tokens"] = outs[0].shape[-2] if outs[0].dim() >= 2 else 1
        seen["width"] = width
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
        blocks, seen = self.blocks, self.seen
        per_block: dict[str, list[str]] = {}
        reasons: dict[str, list[str | None]] = {}
        embed_normed: dict[str, bool] = {}
        for pos, b in enumerate(blocks):
            kind = seen[pos].get("kind", "other")
            why = seen[pos].get("reason") if "kind" in seen[pos] else _unseen(b)
            per_block.setdefault(b.stack, []).append(kind)
            reasons.setdefault(b.stack, []).append(why)
            if b.index == 0:
                embed_normed[b.stack] = bool(seen[pos].get("embed_normed"))
        stacks = {s: stack_kind(ks, embed_normed.get(s, False)) for s, ks in per_block.items()}
        types = set()
        for pos, b in enumerate(blocks):
            width = seen[pos].get("width")
            for name in seen[pos].get("stream_norms", []):
                types.add(norm_type(b.norms[name], int(width)))
        ntype = (
            types.pop()
            if len(types) == 1
            else ("none" if not types else "mixed: " + ", ".join(sorted(types)))
        )
        if ntype == "dyt":  # Pre-LN arranged, every norm a DyT
            stacks = {s: "dyt" if k == "pre-ln" else k for s, k in stacks.items()}
        overall = set(stacks.values())
        placement = overall.pop() if len(overall) == 1 else "other"
        stack_why = {
            s: _stack_reason(per_block[s], reasons[s]) for s, k in stacks.items() if k == "other"
        }
        if placement != "other":
            reason = None
        elif len(stacks) > 1 and len(set(stacks.values())) > 1:
            reason = "stacks differ (" + ", ".join(f"{s} {k}" for s, k in stacks.items()) + ")"
            reason += "".join(f"; {s}: {r}" for s, r in stack_why.items())
        else:
            reason = "; ".join(dict.fromkeys(stack_why.values())) or "no block could be read"
        qk = any(v.get("attention_norms") for v in seen.values())
        detail = "; ".join(f"{s}: {_runs(ks)}" for s, ks in per_block.items())
        detail += _internals(seen)
        return {
            "placement": placement,
            "reason": reason,
            "stacks": stacks,
            "per_block": per_block,
            "detail": detail,
            "norm_type": ntype,
            "qk_norm": qk,
            "item_tokens": seen[0].get("tokens") if seen else None,
        }  # positions per input item (block 0)


def _unseen(block: BlockInfo) -> str:
    return f"block {block.name} did not run, or its input or output holds no stream tensor"


def _mixing_kind(mixers: dict[str, list[dict]]) -> tuple[str, str | None]:
    """A hyper-connection block's kind from what its modules returned."""
    calls = [c for cs in mixers.values() for c in cs]
    n = max(c["n"] for c in calls)
    if all(c["matrix"] and c["doubly_stochastic"] for c in calls) and not all(
        c["permutation"] for c in calls
    ):
        return "mhc", None
    return f"hyper-connections (n={n})", None


def _internals(seen: dict[int, dict]) -> str:
    """The detail's tail: the norms that are not stream norms (named from the first block that
    has them) and the hyper-connection mixers."""
    out = []
    attn = next((v["attention_norms"] for v in seen.values() if v.get("attention_norms")), None)
    if attn:
        out.append(f"QK-norm in attention ({', '.join(attn)})")
    off = next((v["off_stream"] for v in seen.values() if v.get("off_stream")), None)
    if off:
        out.append("norms off the stream " + ", ".join(f"{n} (width {w})" for n, w in off.items()))
    mixers = next((v["mixers"] for v in seen.values() if v.get("mixers")), None)
    if mixers:  # the names from the first block, the matrices of every block
        calls = [c for v in seen.values() for cs in v.get("mixers", {}).values() for c in cs]
        read = [c for c in calls if c["matrix"]]
        ds = sum(c["doubly_stochastic"] for c in read)
        perm = sum(c["permutation"] for c in read)
        err = max((abs(c["error"]) for c in read), default=float("nan"))
        out.append(
            f"hyper-connection mixers {', '.join(mixers)}: {max(c['n'] for c in calls)} residual "
            f"copies, {ds} of {len(read)} mixing matrices doubly stochastic within {DS_TOL:g} "
            f"(largest violation {err:.1e})"
            + (f", {perm} of them identity or permutation mixes" if perm else "")
            + (
                f", {len(calls) - len(read)} calls returned no mixing matrix"
                if len(read) < len(calls)
                else ""
            )
        )
    return "".join(f"; {s}" for s in out)


@torch.no_grad()
def detect_placement(
    blocks: list[BlockInfo], forward: Callable[[], object], model: nn.Module | None = None
) -> dict:
    """{"placement", "reason" (why "other", else None), "stacks": {stack: kind}, "per_block":
    {stack: [kinds]}, "detail", "norm_type", "qk_norm", "item_tokens"}.

    `forward` runs the model once on a small input; `blocks` come from the probe's discovery;
    `model` (optional) lets the norms outside the blocks be watched, for Peri-LN's embedding LN.
    """
    watch = StructureWatch(blocks, model)
    try:
        forward()
    finally:
        watch.remove()
    return watch.result()
