"""fairseq checkpoints (standard transformer, transformer_lm, and ResiDual's `resi_dual`) rebuilt
into residual-probe's models from the state-dict layout, without importing fairseq.

A fairseq `.pt` is a dict: `model` (the state dict), `cfg` (a plain dict since fairseq's Hydra
era; its `model` entry may be nested per stack, or an argparse Namespace) or, in older files,
`args` (a Namespace), plus `optimizer_history`, `extra_state`, `last_optimizer_state`. It is
read with the safe unpickler; namespaces and meters arrive as inert placeholders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models import ConfigError, ModelConfig, Transformer
from ..models.placements import PAPER_PLACEMENTS
from .errors import CheckpointError
from .layout import from_fairseq, shapes, to_fairseq
from .loaded import LoadedModel, missing_notes, ours
from .native import load_exact
from .registry import Source, register
from .safe_pickle import load_pickle, mapping
from .safetensors_io import is_safetensors

PADDING_IDX = 1  # fairseq Dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3; positions start at pad + 1
EOS_IDX, UNK_IDX, SPECIALS = 2, 3, 4
ARCH_PLACEMENTS = {"resi_dual": "residual"}
FAIRSEQ_PLACEMENTS = PAPER_PLACEMENTS  # the ResiDual paper's fairseq code implements these three
UNSUPPORTED_TRUE = (
    "layernorm_embedding",
    "no_scale_embedding",
    "encoder_learned_pos",
    "decoder_learned_pos",
    "no_token_positional_embeddings",
    "cross_self_attention",
    "scale_attn",
    "scale_fc",
    "scale_heads",
    "scale_resids",
)


def is_fairseq(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("model"), dict)
        and ("cfg" in obj or "args" in obj)
    )


def model_args(ckpt: dict) -> dict[str, Any]:
    """fairseq's model options as one flat dict (`encoder_layers`, `decoder_normalize_before`, `arch`, ...)."""
    cfg = mapping(ckpt.get("cfg"))
    args = mapping(cfg.get("model")) if cfg else None
    if args is None:
        args = mapping(ckpt.get("args"))
    if args is None:
        raise CheckpointError(
            "fairseq checkpoint has neither cfg['model'] nor args to describe the model"
        )
    flat = {k: v for k, v in args.items() if not isinstance(v, dict)}
    for stack in (
        "encoder",
        "decoder",
    ):  # Hydra's nested TransformerConfig: encoder.layers -> encoder_layers
        for key, value in (mapping(args.get(stack)) or {}).items():
            flat.setdefault(f"{stack}_{key}", value)
    flat["arch"] = str(flat.get("_name") or flat.get("arch") or "transformer")
    return flat


def config_from(args: dict[str, Any], state: dict[str, torch.Tensor]) -> ModelConfig:
    """A ModelConfig from fairseq's options and the (renamed) weights' shapes; unsupported options are errors."""
    on = sorted(k for k in UNSUPPORTED_TRUE if args.get(k))
    if on:
        raise CheckpointError(
            f"fairseq option {on[0]} is set; residual-probe's models do not implement it"
        )
    if str(args.get("activation_fn", "relu")) != "relu":
        raise CheckpointError(
            f"fairseq activation_fn {args['activation_fn']!r} is not supported (only relu)"
        )
    size = shapes(state)
    stacks = [s for s in ("encoder", "decoder") if any(k.startswith(f"{s}.layers.") for k in state)]
    heads = {args.get(f"{s}_attention_heads") for s in stacks}
    if len(heads) != 1 or None in heads:
        raise CheckpointError(
            f"fairseq cfg must give one attention head count for {' and '.join(stacks)}, got {heads}"
        )
    placement = ARCH_PLACEMENTS.get(args["arch"])
    if placement is None:
        before = {bool(args.get(f"{s}_normalize_before", False)) for s in stacks}
        if len(before) != 1:
            raise CheckpointError(
                "encoder and decoder disagree on normalize_before: mixed placements are not supported"
            )
        placement = "pre-ln" if before.pop() else "post-ln"
    has_final = {any(k.startswith(f"{s}.final_norm.") for k in state) for s in stacks}
    if has_final != {placement != "post-ln"}:
        raise CheckpointError(
            f"fairseq {args['arch']}: {placement} expects {'a' if placement != 'post-ln' else 'no'} "
            "final layer_norm per stack, the weights disagree"
        )
    alphas = {float(args.get(f"{s[:3]}_alpha", 1.0)) for s in stacks}
    if len(alphas) != 1:
        raise CheckpointError(
            f"enc_alpha and dec_alpha differ ({sorted(alphas)}); residual-probe has one alpha"
        )
    proj = state.get("output_projection.weight")
    emb = state.get(f"{stacks[-1]}.embed.embed_tokens.weight")
    shared = bool(args.get("share_decoder_input_output_embed") or args.get("share_all_embeddings"))
    # Stored once (older fairseq keeps no output projection when it is shared), or twice and equal.
    # Absent while the options say it is not shared: a missing weight, reported by load_exact.
    tied = (proj is None and shared) or (
        proj is not None and proj.shape == emb.shape and torch.equal(proj, emb)
    )
    if tied:
        state.pop("output_projection.weight", None)
    max_len = int(
        max(
            args.get("max_source_positions", 1024) or 1024,
            args.get("max_target_positions", 1024) or 1024,
        )
    )
    try:
        return ModelConfig(
            placement=placement,
            heads=int(heads.pop()),
            max_len=max_len,
            position_offset=PADDING_IDX + 1,
            dropout=0.0,
            alpha=alphas.pop(),
            tie_embeddings=tied,
            **size,
            share_all_embeddings=bool(args.get("share_all_embeddings"))
            and len(stacks) == 2
            and tied,
        )
    except ConfigError as exc:
        raise CheckpointError(f"fairseq checkpoint: {exc}") from None


def load_fairseq(
    ckpt: dict, source: str, allow_missing: bool = False
) -> tuple[Transformer, dict[str, Any]]:
    """Rebuild the model of an unpickled fairseq checkpoint; returns (model in eval mode, description)."""
    args = model_args(ckpt)
    state = {k: v for k, v in ckpt["model"].items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: fairseq 'model' entry {bad[0]!r} is not a tensor")
    state = from_fairseq(state)
    if args.get("share_all_embeddings"):  # one embedding for both stacks: either name may carry it
        enc, dec = "encoder.embed.embed_tokens.weight", "decoder.embed.embed_tokens.weight"
        if enc in state or dec in state:
            state.setdefault(enc, state.get(dec))
            state.setdefault(dec, state.get(enc))
        if not any(k.startswith("encoder.layers.") for k in state):
            state.pop(enc, None)
    cfg = config_from(args, state)
    model = Transformer(cfg)
    missing = load_exact(model, {k: v.float() for k, v in state.items()}, source, allow_missing)
    notes = missing_notes(missing)
    scales = {float(args.get(f"{p}_res_input_norm_scale", 1.0)) for p in ("enc", "dec")}
    if scales != {1.0}:
        # The paper's code scales d_0 and every update by s, so LN_f(d) is unchanged up to eps: s = 1 here.
        notes.append(
            f"res_input_norm_scale {sorted(scales)} dropped: LN_f makes it a no-op up to eps"
        )
    return model.eval(), {
        "family": "fairseq",
        "fairseq_arch": args["arch"],
        "notes": notes,
        "missing": missing,
    }


def load_fairseq_file(path: str | Path, trust: bool = False) -> tuple[Transformer, dict[str, Any]]:
    ckpt = load_pickle(path, trust=trust)
    if not is_fairseq(ckpt):
        raise CheckpointError(
            f"{path}: not a fairseq checkpoint (needs 'model' and 'cfg' or 'args')"
        )
    return load_fairseq(ckpt, str(path))


@register(
    "fairseq",
    40,
    lambda s: s.path.is_file() and not is_safetensors(s.path) and is_fairseq(s.pickle()),
)
def load_fairseq_source(source: Source) -> LoadedModel:
    source.no_bare_flags("a fairseq checkpoint (its cfg says them)")
    model, desc = load_fairseq(source.pickle(), str(source.path), source.allow_missing)
    loaded = ours(
        model,
        f"fairseq:{desc['fairseq_arch']}",
        str(source.path),
        desc["notes"],
        desc["missing"],
        decoder_start_id=EOS_IDX,
    )  # fairseq's decoder input starts with </s>
    loaded.special_ids = tuple(range(SPECIALS))
    return loaded


def fairseq_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights in fairseq's layout (as fairseq would save them), for export and tests."""
    cfg = model.cfg
    if cfg.placement not in FAIRSEQ_PLACEMENTS:
        raise CheckpointError(
            f"placement {cfg.placement!r} has no fairseq counterpart ({', '.join(FAIRSEQ_PLACEMENTS)})"
        )
    if cfg.position_offset != PADDING_IDX + 1:
        raise CheckpointError(
            f"fairseq positions start at {PADDING_IDX + 1}; this model's start at {cfg.position_offset}"
        )
    state = to_fairseq({k: v.detach().clone() for k, v in model.state_dict().items()})
    for role, _ in model.stacks():
        state[f"{role}.version"] = torch.tensor([3.0])
        state[f"{role}.embed_positions._float_tensor"] = torch.tensor([1.0])
    return state
