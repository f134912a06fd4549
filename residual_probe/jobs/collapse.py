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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .inspection import CheckpointInputs, Inspection, inspect_checkpoint

CSV_COLUMNS = ("model", "stack", "layer", "stream", "metric", "value")
SIM_COLUMNS = ("model", "stack", "stream", "metric", "layer_i", "layer_j", "value")


@dataclass
class CollapseSpec(CheckpointInputs):
    subsample: int = 256  # tokens kept per layer for the similarity / CKA matrices

    LOWS = (("tokens", 16), ("batch", 1), ("seq_len", 2), ("subsample", 4))


# ---- input -------------------------------------------------------------------------------


def make_batches(
    loaded,
    spec: CollapseSpec,
    text: str,
    item_tokens: int | None = None,
    dictionary: dict | None = None,
) -> tuple[list, dict]:
    """Input batches under the checkpoint data contract (checkpoints.text), and a description of them."""
    import torch

    from ..checkpoints.text import text_windows

    if loaded.modality == "image":  # no text for a vision model: seeded Gaussian images
        per = max(1, item_tokens or 1)
        n = math.ceil(spec.tokens / per)
        gen = torch.Generator().manual_seed(spec.seed)
        images = torch.randn(n, *loaded.image_shape, generator=gen)
        return list(images.split(spec.batch)), {
            "kind": "synthetic images (seeded N(0, 1) pixels)",
            "items": n,
            "tokens": n * per,
            "messages": [],
        }
    w = text_windows(loaded, text, spec.tokens, spec.seq_len, dictionary)
    return list(w.ids.split(spec.batch)), {**w.info, "batch": spec.batch, "messages": w.messages}


# ---- measurement -------------------------------------------------------------------------


# attn_logits: the largest attention logit and the attention entropy per block on the same text
# (`diagnose` reports them beside collapse: a checkpoint whose logits passed the precursor limit)
FORWARD_QUANTITIES = ("forward_stats", "subsample", "attn_logits")


def forward_probe(loaded, spec: CollapseSpec, also: tuple[str, ...] = ()):
    """The probe of the forward statistics (`also`: further quantities of the same pass, as the
    gradient of `diagnose`): every forward pooled into one step, eval-mode forwards included."""
    from ..probe import Probe

    return Probe(
        loaded.model,
        quantities=(*also, *FORWARD_QUANTITIES),
        subsample_tokens=spec.subsample,
        seed=spec.seed,
        blocks=spec.blocks,
        group=None,
        include_eval=True,
    )


class TokenNorms:
    """Every token's ||h||^2/d at every block output (one float a token and block): the mean hides
    massive activations (Sun et al. 2024), so the median and the maximum are kept beside it. Kept
    on the model's device until `rows()`; the hooks copy nothing to the host."""

    def __init__(self, blocks):
        self.values: dict[tuple, list] = {}
        self.handles = [b.module.register_forward_hook(self._hook(b)) for b in blocks]

    def _hook(self, block):
        from ..probe.stats import stream_tensors

        def hook(module, args, output):
            for stream, h in zip(
                block.streams, stream_tensors(output, len(block.streams), block.stacked) or ()
            ):
                v = h.detach().float().pow(2).mean(-1).flatten()  # float32: a median and a max
                self.values.setdefault((block.stack, block.index, stream), []).append(v)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def rows(self) -> list[dict]:
        import torch

        from ..analysis.collapse import token_norm_rows

        return token_norm_rows({k: torch.cat(v).cpu().numpy() for k, v in self.values.items()})


def forward_result(probe, rows: list[dict], norms: TokenNorms, forward_s: float) -> dict:
    """The probe's forward rows with the token norms and the layer x layer matrices."""
    import torch

    from ..analysis import metrics

    # the peak ||h||^2/d comes with the median from the per-token values (TokenNorms)
    rows = [r for r in rows if r["metric"] != "norm_sq_per_dim_max"] + norms.rows()
    t1 = time.perf_counter()
    matrices = {}
    for (stack, stream), H in probe.subsamples().items():  # H: (n_blocks + 1, n_tokens, d)
        matrices[(stack, stream)] = {
            "cosine": metrics.similarity_matrix(H),
            "cka": metrics.cka_matrix(H),
            "effective_rank": torch.stack([metrics.effective_rank(h) for h in H]),
            "width": H.shape[-1],
        }
    return {
        "rows": rows,
        "matrices": matrices,
        "blocks": probe.blocks,
        "times": {"forward_s": forward_s, "similarity_s": time.perf_counter() - t1},
    }


def measure_forward(
    loaded, batches: list, spec: CollapseSpec, advance: Callable[[], None] | None = None
) -> dict:
    """Probe rows and layer x layer matrices of one model over `batches` (all pooled into one step)."""
    import torch

    probe = forward_probe(loaded, spec)
    norms = TokenNorms(probe.blocks)
    t0 = time.perf_counter()
    try:
        with probe, torch.no_grad():
            for x in batches:
                loaded.forward(x)
                if advance:
                    advance()
            rows = probe.step()
    finally:
        norms.remove()
    return forward_result(probe, rows, norms, time.perf_counter() - t0)


# ---- the job -----------------------------------------------------------------------------


def run_collapse(spec: CollapseSpec, out: str | Path, formats=("png",), progress=None) -> dict:
    """Measure every checkpoint, write the tables, JSON and figures; returns the JSON dict."""
    import torch

    from ..output import prepare_out

    spec.validate()
    out = prepare_out(out)
    torch.manual_seed(spec.seed)
    text, source, dictionary = spec.read_inputs()
    table, sim_rows, models = [], [], []
    t_start = time.perf_counter()
    for label, path in spec.named():
        inspection = inspect_checkpoint(label, path, spec, text, dictionary)
        model, rows, sims = measure_collapse(inspection, spec, text, source, progress)
        models.append(model)
        table += rows
        sim_rows += sims
        del inspection
    return write_collapse(
        out, spec, models, table, sim_rows, source, formats, time.perf_counter() - t_start
    )


def measure_collapse(
    inspection: Inspection,
    spec: CollapseSpec,
    text: str,
    source: str,
    progress=None,
    measured: dict | None = None,
) -> tuple[dict, list[dict], list[dict]]:
    """One checkpoint's collapse: its collapse.json entry, its collapse.csv and its similarity.csv rows.

    measured: `forward_result` of a pass that already ran these batches (diagnose's gradient pass,
    `ckpt_grads.model_gradients(forward=...)`); None runs the forward pass here."""
    from ..analysis.collapse import collapse_summary, massive_activations
    from ..analysis.verdicts import overall_detail, overall_verdict

    label, loaded, found = inspection.label, inspection.loaded, inspection.found
    batches, data = make_batches(loaded, spec, text, found["item_tokens"], inspection.dictionary)
    require_collapse_memory(inspection, batches, spec)
    data["source"] = source if loaded.modality == "text" else data["kind"]
    if measured is None:
        advance = progress(len(batches)) if progress else None
        m = measure_forward(loaded, batches, spec, advance)
    else:
        m = measured
    rows = [
        dict(
            model=label,
            stack=r["stack"],
            layer=r["layer"],
            stream=r["stream"],
            metric=r["metric"],
            value=r["value"],
        )
        for r in m["rows"]
        if r["metric"] != "nonfinite_count" and r.get("sublayer", "block") in ("block", "head")
    ]  # a block's pooled attention rows, not those of each of its attention modules
    nonfinite = sum(1 for r in rows if not math.isfinite(r["value"]))
    sim_rows = []
    for (stack, stream), mats in m["matrices"].items():
        n = mats["cosine"].shape[0]
        rows += [
            dict(
                model=label,
                stack=stack,
                layer=i - 1,
                stream=stream,
                metric="effective_rank",
                value=v,
            )
            for i, v in enumerate(mats["effective_rank"].tolist())
        ]
        for metric in ("cosine", "cka"):
            values = mats[metric].tolist()
            sim_rows += [
                dict(
                    model=label,
                    stack=stack,
                    stream=stream,
                    metric=metric,
                    layer_i=i - 1,
                    layer_j=j - 1,
                    value=values[i][j],
                )
                for i in range(n)
                for j in range(n)
            ]
    summary = collapse_summary(label, rows)
    model = {
        **inspection.description(),
        "verdict": overall_verdict(summary),
        "verdict_from": overall_detail(summary),
        "streams": summary,
        "massive_activations": massive_activations(rows),
        "nonfinite_values": nonfinite,
        "data": data,
        "times": {"load_s": inspection.load_s, **m["times"]},
    }
    return model, rows, sim_rows


def write_collapse(
    out: Path,
    spec: CollapseSpec,
    models: list[dict],
    table: list[dict],
    sim_rows: list[dict],
    source: str,
    formats,
    wall_seconds: float,
) -> dict:
    """collapse.csv, similarity.csv, the figures and collapse.json of the measured checkpoints."""
    import numpy as np
    import pandas as pd

    from ..analysis.theory import collapse_prediction
    from ..analysis.verdicts import COLLAPSED_COS, COLLAPSING_COS, COLLAPSING_RATIO
    from ..output import versions, write_csv, write_json
    from ..plots.collapse import plot_collapse_curves, plot_norm_growth, plot_similarity

    meta = {
        "spec": {**asdict(spec), "ckpts": list(spec.ckpts)},
        "models": models,
        "data_source": source,
        "versions": versions(),
        "wall_seconds": wall_seconds,
        "thresholds": {
            "collapsed_cos": COLLAPSED_COS,
            "collapsing_cos": COLLAPSING_COS,
            "collapsing_ratio": COLLAPSING_RATIO,
        },
    }
    files = [
        write_csv(out / "collapse.csv", table, CSV_COLUMNS),
        write_csv(out / "similarity.csv", sim_rows, SIM_COLUMNS),
    ]
    placements = {m["label"]: m["placement"] for m in models}
    depth = max((r["layer"] + 1 for r in table if r["metric"] == "cos_adjacent"), default=1)
    cos = collapse_prediction("pre-ln", np.arange(1, depth + 1))[
        "cos_adjacent"
    ]  # 0-based block k is the toy's k + 1
    theory = {"cos_adjacent": cos, "block_influence": 1 - cos}
    files += plot_collapse_curves(table, placements, theory, out / "collapse_curves", formats)
    files += plot_similarity(
        pd.DataFrame(sim_rows, columns=SIM_COLUMNS), out / "similarity", formats
    )
    files += plot_norm_growth(table, placements, out / "norm_growth", formats)
    meta["files"] = [str(f) for f in files] + [str(out / "collapse.json")]
    write_json(out / "collapse.json", meta)
    return meta


def require_collapse_memory(inspection: Inspection, batches: list, spec: CollapseSpec) -> None:
    """Refuse (budget.BudgetError) a forward whose activations and matrices would not fit."""
    from .. import budget

    loaded, found = inspection.loaded, inspection.found
    if loaded.width is None or not batches:
        return
    shape = batches[0].shape
    blocks = sum(len(kinds) for kinds in found.get("per_block", {}).values())
    est = budget.collapse_estimate(
        inspection.label,
        loaded.parameters,
        blocks,
        loaded.width,
        2 if found["placement"] == "residual" else 1,
        shape[0],
        shape[1] if loaded.modality == "text" else (found["item_tokens"] or 1),
        spec.subsample,
    )
    budget.check(est, spec.force)
