"""What every loader returns: a `LoadedModel`, the model plus how to run its body and its heads.

The body forward (no output head: logits are not needed for representations and would dominate
memory) serves `collapse`; the `heads` serve `grad-norms --ckpt`, one callable per loss kind the
checkpoint can compute:
- "causal-lm": logits(ids (B, T)) -> (B, T, V), position t predicts token t + 1;
- "mlm": logits(masked ids (B, T)) -> (B, T, V), predicted at the masked positions;
- "seq2seq": logits(src (B, T), decoder input (B, T)) -> (B, T, V), teacher-forced.
"contrastive" needs no head: any text model's body gives it (`jobs.ckpt_grads.simcse_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

LOSSES = ("causal-lm", "seq2seq", "mlm", "contrastive")


def hidden_states(out) -> torch.Tensor:
    """The (B, T, C) last hidden state of a body forward's output (a tensor, a Hugging Face output, a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    return out[0]


@dataclass
class LoadedModel:
    model: nn.Module  # the whole model, in eval mode; the probe attaches here
    forward: Callable[
        [torch.Tensor], Any
    ]  # runs the body on a batch (B, T) of ids, or (B, C, H, W) images
    family: str  # residual-probe, fairseq:<arch>, huggingface:<model_type>, state-dict
    source: str
    modality: str = "text"  # "text" or "image"
    vocab_size: int | None = None
    max_len: int | None = None  # longest sequence the positions cover (None: unbounded)
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) for image models
    tokenizer: Any = None  # a Hugging Face tokenizer when the folder has one
    declared_placement: str | None = None  # from the config, where it names one
    notes: list[str] = field(default_factory=list)
    missing_weights: list[str] = field(
        default_factory=list
    )  # left at random init (--allow-missing-weights)
    heads: dict[str, Callable[..., torch.Tensor]] = field(
        default_factory=dict
    )  # loss kind -> logits function
    default_loss: str | None = None  # the loss the checkpoint was trained with, where it says
    mask_id: int | None = None  # the token that replaces masked positions for "mlm"
    decoder_start_id: int | None = None  # first decoder input for "seq2seq"
    special_ids: tuple[
        int, ...
    ] = ()  # ids byte-level input must avoid (fairseq's <s>, <pad>, </s>, <unk>)
    norm_type: str | None = None  # filled by placement detection: layernorm / rmsnorm / ...

    @property
    def partly_random(self) -> bool:
        return bool(self.missing_weights)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    @property
    def width(self) -> int | None:
        """The residual-stream width: our config's d_model, or a Hugging Face config's hidden_size /
        d_model / n_embd / dim / embed_dim; None when the model's config names none."""
        cfg = getattr(self.model, "cfg", None) or getattr(self.model, "config", None)
        for name in ("d_model", "hidden_size", "n_embd", "dim", "embed_dim"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None


def first_names(names: Sequence[str], shown: int = 3) -> str:
    """The first `shown` names and how many more ("a, b, c and 4 more"), for a one-line message."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def missing_notes(missing: Sequence[str]) -> list[str]:
    """Every loader's note on weights left at random initialization (`--allow-missing-weights`):
    the verdicts are then about a partly random model. [] when nothing is missing."""
    if not missing:
        return []
    return [
        f"partly random model: {len(missing)} weights missing from the checkpoint were left at "
        f"random initialization ({first_names(missing)})"
    ]


def body_forward(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Our Transformer's stacks without the output projection; seq2seq reads the same ids as target."""
    if model.cfg.arch == "seq2seq":
        return lambda ids: model.decoder(ids, memory=model.encoder(ids))
    stack = model.encoder or model.decoder
    return lambda ids: stack(ids)


def ours(
    model,
    family: str,
    source: str,
    notes: list[str] | None = None,
    missing: list[str] | None = None,
    decoder_start_id: int = 0,
) -> LoadedModel:
    """A residual-probe `Transformer` (native, fairseq or bare weights) as a LoadedModel.

    Its one head is the one it was built for: decoder -> causal LM, encoder -> masked LM (mask id 0,
    the reserved token of the byte-level task), seq2seq -> teacher-forced translation.
    """
    from ..data import RESERVED

    cfg = model.cfg
    kind = {"decoder": "causal-lm", "encoder": "mlm", "seq2seq": "seq2seq"}[cfg.arch]
    head = (lambda src, tgt: model(src, tgt)) if kind == "seq2seq" else (lambda ids: model(ids))
    return LoadedModel(
        model,
        body_forward(model),
        family,
        source,
        vocab_size=cfg.vocab_size,
        max_len=cfg.max_len,
        declared_placement=cfg.placement,
        notes=list(notes or []),
        missing_weights=list(missing or []),
        heads={kind: head},
        default_loss=kind,
        mask_id=RESERVED,
        decoder_start_id=decoder_start_id,
    )
