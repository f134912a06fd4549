"""State-dict layouts: fairseq's module names versus residual-probe's, and sizes read from shapes.

One table maps names both ways, so export (for tests and users) and import cannot drift apart.
`{s}` is a stack (encoder/decoder), `{i}` a layer index; fairseq's q/k/v/out projections and
fc1/fc2 keep their names, its LayerNorms are named after their sublayer.
"""

from __future__ import annotations

import re

import torch

from .errors import CheckpointError

# (residual-probe prefix, fairseq prefix); more specific rows first.
TABLE = [
    ("{s}.layers.{i}.self_attn.norm.", "{s}.layers.{i}.self_attn_layer_norm."),
    ("{s}.layers.{i}.self_attn.", "{s}.layers.{i}.self_attn."),
    ("{s}.layers.{i}.cross_attn.norm.", "{s}.layers.{i}.encoder_attn_layer_norm."),
    ("{s}.layers.{i}.cross_attn.", "{s}.layers.{i}.encoder_attn."),
    ("{s}.layers.{i}.ffn.norm.", "{s}.layers.{i}.final_layer_norm."),
    ("{s}.layers.{i}.ffn.fc", "{s}.layers.{i}.fc"),
    ("{s}.embed.embed_tokens.", "{s}.embed_tokens."),
    ("{s}.final_norm.", "{s}.layer_norm."),
    ("output_projection.", "decoder.output_projection."),
]
# fairseq entries that carry no weights: a format version and the sinusoidal table's dtype probe.
FAIRSEQ_IGNORED = re.compile(r"^(encoder|decoder)\.(version|embed_positions\._float_tensor)$")


def _compile(form: str) -> re.Pattern:
    pattern = (
        re.escape(form).replace(r"\{s\}", "(?P<s>encoder|decoder)").replace(r"\{i\}", r"(?P<i>\d+)")
    )
    return re.compile("^" + pattern)


def _rename(name: str, rows: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in rows:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict()) + name[m.end() :]
    return None


_TO_FAIRSEQ = [(_compile(ours), theirs) for ours, theirs in TABLE]
_FROM_FAIRSEQ = [(_compile(theirs), ours) for ours, theirs in TABLE]


def to_fairseq(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """residual-probe names -> fairseq names; a name with no fairseq twin is an error."""
    out = {}
    for name, t in state.items():
        new = _rename(name, _TO_FAIRSEQ)
        if new is None:
            raise CheckpointError(
                f"{name}: no fairseq equivalent (fairseq has only post-ln, pre-ln and resi_dual)"
            )
        out[new] = t
    return out


def from_fairseq(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fairseq names -> residual-probe names, dropping weightless entries; unknown names are an error."""
    out, unknown = {}, []
    for name, t in state.items():
        if FAIRSEQ_IGNORED.match(name):
            continue
        new = _rename(name, _FROM_FAIRSEQ)
        if new is None:
            unknown.append(name)
        else:
            out[new] = t
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} weights have no counterpart in residual-probe's models (e.g. {unknown[0]}): "
            "layernorm_embedding, learned positions and similar fairseq options are not supported"
        )
    return out


FAIRSEQ_MARK = re.compile(
    r"^(encoder|decoder)\.(embed_tokens\.|layers\.\d+\.(self_attn_layer_norm|final_layer_norm|fc1)\.)"
)


def looks_fairseq(state: dict[str, torch.Tensor]) -> bool:
    return any(FAIRSEQ_MARK.match(k) for k in state)


def shapes(state: dict[str, torch.Tensor]) -> dict:
    """Sizes readable from a residual-probe-named state dict: arch, depths, d_model, ffn, vocab,
    and qk_norm where the attention holds q_norm weights."""
    depth = {}
    for s in ("encoder", "decoder"):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"^{s}\.layers\.(\d+)\.", k))}
        if idx and idx != set(range(len(idx))):
            raise CheckpointError(
                f"{s} layers are not numbered 0..{len(idx) - 1} (found {sorted(idx)[:8]})"
            )
        depth[s] = len(idx)
    if not depth["encoder"] and not depth["decoder"]:
        raise CheckpointError(
            "no transformer layers found in the weights (expected encoder.layers.* or decoder.layers.*)"
        )
    arch = (
        "seq2seq"
        if depth["encoder"] and depth["decoder"]
        else ("encoder" if depth["encoder"] else "decoder")
    )
    stack = "decoder" if depth["decoder"] else "encoder"
    emb = state.get(f"{stack}.embed.embed_tokens.weight")
    fc1 = state.get(f"{stack}.layers.0.ffn.fc1.weight")
    if emb is None or emb.dim() != 2 or fc1 is None or fc1.dim() != 2:
        raise CheckpointError(
            f"weights lack {stack}'s token embedding or first FFN (embed_tokens, fc1)"
        )
    out = {
        "arch": arch,
        "depth": depth["encoder"] or depth["decoder"],
        "vocab_size": emb.shape[0],
        "d_model": emb.shape[1],
        "ffn": fc1.shape[0],
    }
    if arch == "seq2seq" and depth["decoder"] != depth["encoder"]:
        out["decoder_depth"] = depth["decoder"]
    if f"{stack}.layers.0.self_attn.q_norm.weight" in state:  # ModelConfig(qk_norm=True)
        out["qk_norm"] = True
    return out
