"""One inspection of a checkpoint for `grad-norms --ckpt`, `collapse` and `diagnose`.

Each job reads checkpoints the same way: load the file safely (residual_probe.checkpoints), find
its blocks (probe discovery, or `--blocks`), read its placement from their structure on a one-item
input (probe.structure.detect_placement), and describe the model (family, placement, depth, width,
parameters) in its JSON. `inspect_checkpoint` does that once; `diagnose` hands the one inspection
to both of its parts, so a checkpoint is loaded once per command.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckpointInputs:
    """What the checkpoint jobs share: which checkpoints, how to load them, and the text they read
    (the data contract of checkpoints.text)."""

    ckpts: tuple[str, ...]
    data: str | None = None  # UTF-8 text file; None: the built-in corpus (CPython's pydoc topics)
    tokens: int = 8192  # tokens (positions) run through each model
    batch: int = 8
    seq_len: int = 256
    seed: int = 0  # MLM masking, the token subsample, synthetic images
    trust_pickle: bool = False
    allow_missing: bool = False  # measure weights the files lack at random init (verdict says so)
    allow_unused: bool = (
        False  # stored weights of blocks the config omits (a truncated model) accepted
    )
    dictionary: str | None = None  # fairseq dict.txt for fairseq checkpoints
    blocks: str | None = (
        None  # module-path pattern when block discovery fails, e.g. "model.layers.*"
    )
    bare: dict = field(default_factory=dict)  # placement, heads, depth, ... for bare state dicts
    labels: tuple[
        str, ...
    ] = ()  # names of the models (ckpts order); default: shortest distinct path suffixes
    force: bool = False  # run even when the memory estimate exceeds what the machine has free

    # (field, lowest value) checked by validate(), in this order
    LOWS = (("tokens", 1), ("batch", 1), ("seq_len", 2))

    def validate(self) -> None:
        from ..models import ConfigError

        if not self.ckpts:
            raise ConfigError("give at least one checkpoint (--ckpt)")
        for name, low in self.LOWS:
            if getattr(self, name) < low:
                raise ConfigError(
                    f"{name.replace('_', '-')}: must be >= {low}, got {getattr(self, name)}"
                )
        if self.labels:
            if len(self.labels) != len(self.ckpts):
                raise ConfigError(
                    f"--label: {len(self.labels)} names for {len(self.ckpts)} checkpoints; "
                    "give one per --ckpt / --compare, in that order"
                )
            if len(set(self.labels)) != len(self.labels) or not all(
                str(x).strip() for x in self.labels
            ):
                raise ConfigError(
                    f"--label: names must be distinct and non-empty, got {list(self.labels)}"
                )

    def named(self) -> list[tuple[str, str]]:
        """(label, path) of every checkpoint, in order."""
        from ..checkpoints.registry import labels_for

        return list(zip(self.labels or labels_for(self.ckpts), self.ckpts))

    def read_inputs(self) -> tuple[str, str, dict[str, int] | None]:
        """(text, its description, the fairseq dictionary or None), read once for all checkpoints."""
        from ..checkpoints.text import read_fairseq_dict, read_text

        text, source = read_text(self.data)
        return text, source, read_fairseq_dict(self.dictionary) if self.dictionary else None


@dataclass
class Inspection:
    """A loaded checkpoint, its blocks and its detected placement."""

    label: str
    path: str
    loaded: Any  # checkpoints.LoadedModel
    blocks: list  # probe.discovery.BlockInfo, in module order
    found: dict  # probe.structure.detect_placement's result
    dictionary: dict[str, int] | None  # the fairseq dictionary this model's text is tokenized with
    load_s: float  # seconds to load the files (detection not included)

    @property
    def depth(self) -> dict[str, int]:
        """Blocks per stack."""
        depth: dict[str, int] = {}
        for b in self.blocks:
            depth[b.stack] = max(depth.get(b.stack, 0), b.index + 1)
        return depth

    def description(self) -> dict:
        """The model as every job's JSON describes it."""
        loaded, found = self.loaded, self.found
        return {
            "label": self.label,
            "source": self.path,
            "family": loaded.family,
            "modality": loaded.modality,
            "placement": found["placement"],
            "placement_reason": found["reason"],  # why "other", else None
            "placement_detail": found["detail"],
            "norm_type": found["norm_type"],
            "qk_norm": found["qk_norm"],
            "declared_placement": loaded.declared_placement,
            "depth": self.depth,
            "width": loaded.width,
            "parameters": loaded.parameters,
            "partly_random": loaded.missing_weights,
            "notes": loaded.notes,
        }


def inspect_checkpoint(
    label: str,
    path: str,
    spec: CheckpointInputs,
    text: str,
    dictionary: dict[str, int] | None = None,
) -> Inspection:
    """Load `path` with `spec`'s options and detect its placement on a one-item input of `text`."""
    import torch

    from ..checkpoints import load_any
    from ..probe import find_blocks
    from ..probe.structure import detect_placement

    t0 = time.perf_counter()
    loaded = load_any(
        path,
        trust_pickle=spec.trust_pickle,
        allow_missing=spec.allow_missing,
        allow_unused=spec.allow_unused,
        **spec.bare,
    )
    load_s = time.perf_counter() - t0
    own = (
        dictionary if loaded.family.startswith("fairseq") else None
    )  # other models read bytes or their tokenizer
    blocks = find_blocks(loaded.model, spec.blocks)
    sample = detection_sample(loaded, text, spec.seed, own)
    with torch.no_grad():
        found = detect_placement(blocks, lambda: loaded.forward(sample), loaded.model)
    loaded.norm_type = found["norm_type"]
    return Inspection(label, str(path), loaded, blocks, found, own, load_s)


def detection_sample(loaded, text: str, seed: int, dictionary: dict[str, int] | None = None):
    """A one-item input for placement detection: up to 8 tokens of `text`, or one seeded N(0, 1) image."""
    import torch

    from ..checkpoints.text import tokenize

    if loaded.modality == "image":
        return torch.randn(1, *loaded.image_shape, generator=torch.Generator().manual_seed(seed))
    ids, _ = tokenize(loaded, text, 16, dictionary)
    n = min(8, ids.numel(), loaded.max_len or 8)
    return ids[:n].view(1, n)
