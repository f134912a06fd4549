"""The `collapse` job: how much each layer of a real checkpoint still changes its representation.

For each checkpoint: load it safely (residual_probe.checkpoints), read its placement from the
block structure, run text through its body with the probe attached (forward statistics reduced
inside the hooks, one bounded token subsample for the layer x layer matrices), and judge
collapse from the adjacent cosine of its later blocks (analysis.collapse). Outputs in `out`:
- collapse.csv    model, stack, layer, stream, metric, value (every per-layer representation metric)
- similarity.csv  model, stack, stream, metric (cosine / cka), layer_i, layer_j, value
                  (layer -1 is the embedding output, k the output of block k)
- collapse.json   per model: family, detected and declared placement, depth, width, parameters,
                  verdicts, most redundant layers; the data; times; versions
- collapse_curves.png, similarity.png, norm_growth.png
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

CSV_COLUMNS = ("model", "stack", "layer", "stream", "metric", "value")
SIM_COLUMNS = ("model", "stack", "stream", "metric", "layer_i", "layer_j", "value")


@dataclass
class CollapseSpec:
    ckpts: tuple[str, ...]
    data: str | None = None  # UTF-8 text file; None: the built-in corpus (CPython's pydoc topics)
    tokens: int = 8192  # tokens (positions) run through each model
    batch: int = 8
    seq_len: int = 256
    subsample: int = 256  # tokens kept per layer for the similarity / CKA matrices
    seed: int = 0
    trust_pickle: bool = False
    allow_missing: bool = False  # measure weights the files lack at random init (verdict says so)
    allow_unused: bool = False  # stored weights of blocks the config omits (a truncated model) accepted
    dictionary: str | None = None  # fairseq dict.txt for fairseq checkpoints
    blocks: str | None = None  # module-path pattern when block discovery fails, e.g. "model.layers.*"
    bare: dict = field(default_factory=dict)  # placement, heads, depth, ... for bare state dicts
    force: bool = False  # run even when the memory estimate exceeds what the machine has free
    labels: tuple[str, ...] = ()  # names of the models (ckpts order); default: shortest distinct path suffixes

    def validate(self) -> None:
        from ..models import ConfigError

        if not self.ckpts:
            raise ConfigError("give at least one checkpoint (--ckpt)")
        for name, low in (("tokens", 16), ("batch", 1), ("seq_len", 2), ("subsample", 4)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name.replace('_', '-')}: must be >= {low}, got {getattr(self, name)}")
        if self.labels:
            if len(self.labels) != len(self.ckpts):
                raise ConfigError(f"--label: {len(self.labels)} names for {len(self.ckpts)} checkpoints; "
                                  "give one per --ckpt / --compare, in that order")
            if len(set(self.labels)) != len(self.labels) or not all(str(x).strip() for x in self.labels):
                raise ConfigError(f"--label: names must be distinct and non-empty, got {list(self.labels)}")


# ---- input -------------------------------------------------------------------------------


def make_batches(loaded, spec: CollapseSpec, text: str, item_tokens: int | None = None,
                 dictionary: dict | None = None) -> tuple[list, dict]:
    """Input batches under the checkpoint data contract (checkpoints.text), and a description of them."""
    import torch

    from ..checkpoints.text import text_windows

    if loaded.modality == "image":  # no text for a vision model: seeded Gaussian images
        per = max(1, item_tokens or 1)
        n = math.ceil(spec.tokens / per)
        gen = torch.Generator().manual_seed(spec.seed)
        images = torch.randn(n, *loaded.image_shape, generator=gen)
        return list(images.split(spec.batch)), {"kind": "synthetic images (seeded N(0, 1) pixels)", "items": n,
                                                "tokens": n * per, "messages": []}
    w = text_windows(loaded, text, spec.tokens, spec.seq_len, dictionary)
    return list(w.ids.split(spec.batch)), {**w.info, "batch": spec.batch, "messages": w.messages}


# ---- measurement -------------------------------------------------------------------------


def detect(loaded, sample, blocks: str | None = None) -> dict:
    import torch

    from ..probe import find_blocks
    from ..probe.structure import detect_placement

    with torch.no_grad():
        found = detect_placement(find_blocks(loaded.model, blocks), lambda: loaded.forward(sample), loaded.model)
    loaded.norm_type = found["norm_type"]
    return found


def measure(loaded, batches: list, spec: CollapseSpec, advance: Callable[[], None] | None = None) -> dict:
    """Probe rows and layer x layer matrices of one model over `batches` (all pooled into one step)."""
    import torch

    from ..analysis import metrics
    from ..probe import Probe

    from ..analysis.collapse import token_norm_rows
    from ..probe.stats import stream_tensors

    probe = Probe(loaded.model, quantities=("forward_stats", "subsample"), subsample_tokens=spec.subsample,
                  seed=spec.seed, blocks=spec.blocks, group=None, include_eval=True)
    # every token's ||h||^2/d at every block output (a few floats a token and block, on the host): the
    # mean hides massive activations (Sun et al. 2024), so the median and the maximum are kept beside it
    per_token: dict[tuple, list] = {}

    def keep(block):
        def hook(module, args, output):
            for stream, h in zip(block.streams, stream_tensors(output, len(block.streams)) or ()):
                v = h.detach().float().pow(2).mean(-1).flatten().cpu()  # float32: a median and a max
                per_token.setdefault((block.stack, block.index, stream), []).append(v)
        return hook

    handles = [b.module.register_forward_hook(keep(b)) for b in probe.blocks]
    t0 = time.perf_counter()
    try:
        with probe, torch.no_grad():
            for x in batches:
                loaded.forward(x)
                if advance:
                    advance()
            rows = probe.step()
    finally:
        for h in handles:
            h.remove()
    rows += token_norm_rows({k: torch.cat(v).numpy() for k, v in per_token.items()})
    t1 = time.perf_counter()
    matrices = {}
    for (stack, stream), H in probe.subsamples().items():  # H: (n_blocks + 1, n_tokens, d)
        matrices[(stack, stream)] = {
            "cosine": metrics.similarity_matrix(H), "cka": metrics.cka_matrix(H),
            "effective_rank": torch.stack([metrics.effective_rank(h) for h in H]), "width": H.shape[-1],
        }
    t2 = time.perf_counter()
    return {"rows": rows, "matrices": matrices, "blocks": probe.blocks,
            "times": {"forward_s": t1 - t0, "similarity_s": t2 - t1}}


# ---- the job -----------------------------------------------------------------------------


def run_collapse(spec: CollapseSpec, out: str | Path, formats=("png",), progress=None) -> dict:
    """Measure every checkpoint, write the tables, JSON and figures; returns the JSON dict."""
    import numpy as np
    import pandas as pd
    import torch

    from ..analysis.collapse import (COLLAPSED_COS, COLLAPSING_COS, COLLAPSING_RATIO, collapse_summary,
                                     massive_activations, overall_detail, overall_verdict)
    from ..analysis.theory import collapse_prediction
    from ..checkpoints import load_any
    from ..checkpoints.registry import labels_for
    from ..checkpoints.text import read_fairseq_dict, read_text
    from ..output import prepare_out, versions, write_csv, write_json
    from ..plots.collapse import plot_collapse_curves, plot_norm_growth, plot_similarity

    spec.validate()
    out = prepare_out(out)
    torch.manual_seed(spec.seed)
    text, source = read_text(spec.data)
    dictionary = read_fairseq_dict(spec.dictionary) if spec.dictionary else None
    table, sim_rows, models = [], [], []
    t_start = time.perf_counter()
    for label, path in zip(spec.labels or labels_for(spec.ckpts), spec.ckpts):
        t0 = time.perf_counter()
        loaded = load_any(path, trust_pickle=spec.trust_pickle, allow_missing=spec.allow_missing,
                          allow_unused=spec.allow_unused, **spec.bare)
        t1 = time.perf_counter()
        sample = _sample(loaded, spec, text)
        found = detect(loaded, sample, spec.blocks)
        batches, data = make_batches(loaded, spec, text, found["item_tokens"],
                                     dictionary if loaded.family.startswith("fairseq") else None)
        check_memory(label, loaded, found, batches, spec)
        data["source"] = source if loaded.modality == "text" else data["kind"]
        advance = progress(len(batches)) if progress else None
        m = measure(loaded, batches, spec, advance)
        rows = [dict(model=label, stack=r["stack"], layer=r["layer"], stream=r["stream"], metric=r["metric"],
                     value=r["value"]) for r in m["rows"] if r["metric"] != "nonfinite_count"]
        nonfinite = sum(1 for r in rows if not math.isfinite(r["value"]))
        for (stack, stream), mats in m["matrices"].items():
            n = mats["cosine"].shape[0]
            rows += [dict(model=label, stack=stack, layer=i - 1, stream=stream, metric="effective_rank", value=v)
                     for i, v in enumerate(mats["effective_rank"].tolist())]
            for metric in ("cosine", "cka"):
                values = mats[metric].tolist()
                sim_rows += [dict(model=label, stack=stack, stream=stream, metric=metric, layer_i=i - 1,
                                  layer_j=j - 1, value=values[i][j]) for i in range(n) for j in range(n)]
        summary = collapse_summary(label, rows)
        depth = {}
        for b in m["blocks"]:
            depth[b.stack] = max(depth.get(b.stack, 0), b.index + 1)
        width = next(iter(m["matrices"].values()))["width"] if m["matrices"] else None
        models.append({
            "label": label, "source": str(path), "family": loaded.family, "modality": loaded.modality,
            "placement": found["placement"], "placement_detail": found["detail"], "norm_type": found["norm_type"],
            "declared_placement": loaded.declared_placement, "depth": depth, "width": width,
            "parameters": loaded.parameters, "verdict": overall_verdict(summary),
            "verdict_from": overall_detail(summary), "streams": summary,
            "massive_activations": massive_activations(rows),
            "partly_random": loaded.missing_weights,
            "nonfinite_values": nonfinite, "notes": loaded.notes, "data": data,
            "times": {"load_s": t1 - t0, **m["times"]},
        })
        table += rows
        del loaded, m, batches
    meta = {"spec": {**asdict(spec), "ckpts": list(spec.ckpts)}, "models": models, "data_source": source,
            "versions": versions(), "wall_s": time.perf_counter() - t_start,
            "thresholds": {"collapsed_cos": COLLAPSED_COS, "collapsing_cos": COLLAPSING_COS,
                           "collapsing_ratio": COLLAPSING_RATIO}}
    files = [write_csv(out / "collapse.csv", table, CSV_COLUMNS), write_csv(out / "similarity.csv", sim_rows, SIM_COLUMNS)]
    placements = {m["label"]: m["placement"] for m in models}
    depth = max((r["layer"] + 1 for r in table if r["metric"] == "cos_adjacent"), default=1)
    cos = collapse_prediction("pre-ln", np.arange(1, depth + 1))["cos_adjacent"]  # 0-based block k is the toy's k + 1
    theory = {"cos_adjacent": cos, "block_influence": 1 - cos}
    files += plot_collapse_curves(table, placements, theory, out / "collapse_curves", formats)
    files += plot_similarity(pd.DataFrame(sim_rows, columns=SIM_COLUMNS), out / "similarity", formats)
    files += plot_norm_growth(table, placements, out / "norm_growth", formats)
    meta["files"] = [str(f) for f in files] + [str(out / "collapse.json")]
    write_json(out / "collapse.json", meta)
    return meta


def check_memory(label: str, loaded, found: dict, batches: list, spec: CollapseSpec) -> None:
    """Refuse (budget.BudgetError) a forward whose activations and matrices would not fit."""
    from .. import budget

    width = budget.model_width(loaded.model)
    if width is None or not batches:
        return
    shape = batches[0].shape
    blocks = sum(len(kinds) for kinds in found.get("per_block", {}).values())
    est = budget.collapse_estimate(label, loaded.parameters, blocks, width, 2 if found["placement"] == "residual" else 1,
                                   shape[0], shape[1] if loaded.modality == "text" else (found["item_tokens"] or 1),
                                   spec.subsample)
    budget.check(est, spec.force)


def _sample(loaded, spec: CollapseSpec, text: str):
    """A one-item input for placement detection."""
    import torch

    from ..checkpoints.text import tokenize

    if loaded.modality == "image":
        return torch.randn(1, *loaded.image_shape, generator=torch.Generator().manual_seed(spec.seed))
    ids, _ = tokenize(loaded, text, 16)
    n = min(8, ids.numel(), loaded.max_len or 8)
    return ids[:n].view(1, n)
