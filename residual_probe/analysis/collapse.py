"""Collapse diagnosis of one model: a verdict per stream from its per-block adjacent cosines.

Thresholds on the adjacent cosine of the last third of the blocks. A block whose output
keeps cos >= 0.98 with its input turns the representation by under 11 degrees: ShortGPT
removes such blocks with little loss. "collapsing": later blocks change the stream less than
half as much as early ones, the Pre-LN signature (cos_k ~ sqrt(k / (k + 1)) in the toy model).
"""

from __future__ import annotations

import math

import numpy as np

from .rows import by_layer as rows_by_layer
from .rows import in_order
from .verdicts import collapse_verdict

REDUNDANT_SHOWN = 3


MASSIVE = (
    100.0  # a token is a massive activation when its ||h||^2/d is above 100x its block's median
)
# Sun et al. 2024's massive activations appear at one block and stay through most of the later ones;
# a run of consecutive blocks with massive tokens is persistent when it spans at least this share
# of the stack (and at least 2 blocks), else transient (SmolLM2-135M: a 3-block bump at blocks 2-4,
# then blocks 11-28 of 30)
PERSISTENT_SHARE = 0.25


def token_norm_rows(per_token: dict[tuple, "np.ndarray"]) -> list[dict]:
    """Rows of the per-token ||h||^2/d at each block output, {(stack, layer, stream): values}:
    its median, maximum and the number of tokens above MASSIVE x the median (`massive_count`, with
    `tokens` beside it)."""
    rows = []
    for (stack, layer, stream), v in per_token.items():
        med = float(np.median(v))
        for metric, value in (
            ("norm_sq_per_dim_median", med),
            ("norm_sq_per_dim_max", float(v.max())),
            ("massive_count", float((v > MASSIVE * med).sum())),
            ("tokens", float(v.size)),
        ):
            rows.append(
                dict(
                    step=0,
                    stack=stack,
                    layer=layer,
                    sublayer="block",
                    stream=stream,
                    metric=metric,
                    value=value,
                )
            )
    return rows


def massive_activations(rows: list[dict]) -> list[dict]:
    """Per (stack, stream) of `token_norm_rows` rows: where massive activations (Sun et al. 2024)
    appear and persist. Runs of consecutive blocks with tokens above MASSIVE x the median are split
    into persistent (at least PERSISTENT_SHARE of the stack's blocks and 2 blocks) and transient;
    each run: {"first", "last", "peak" (the largest ||h||^2/d in the run), "peak_block", "median"
    (that block's median), "ratio" (peak / median), "count_min", "count_max" (massive tokens per
    block), "tokens"}. A finding without runs has none: the stream has no massive activations."""
    wanted = ("norm_sq_per_dim_median", "norm_sq_per_dim_max", "massive_count", "tokens")
    by: dict[tuple, dict[int, dict[str, float]]] = {}
    for r in rows:
        if r["metric"] in wanted:
            by.setdefault((r["stack"], r["stream"]), {}).setdefault(int(r["layer"]), {})[
                r["metric"]
            ] = float(r["value"])
    out = []
    for (stack, stream), layers in by.items():
        blocks = sorted(k for k in layers if all(m in layers[k] for m in wanted))
        runs: list[list[int]] = []  # consecutive blocks with massive tokens
        for k in blocks:
            if layers[k]["massive_count"] > 0:
                if runs and runs[-1][-1] == k - 1:
                    runs[-1].append(k)
                else:
                    runs.append([k])
        min_len = max(2, math.ceil(PERSISTENT_SHARE * len(blocks)))
        finding = {"stack": stack, "stream": stream, "blocks": len(blocks)}
        finding["persistent"] = [_run(r, layers) for r in runs if len(r) >= min_len]
        finding["transient"] = [_run(r, layers) for r in runs if len(r) < min_len]
        finding["persistent_from"] = min_len
        out.append(finding)
    return out


def _run(blocks: list[int], layers: dict[int, dict[str, float]]) -> dict:
    peak = max(blocks, key=lambda k: layers[k]["norm_sq_per_dim_max"])
    v = layers[peak]
    counts = [int(layers[k]["massive_count"]) for k in blocks]
    return {
        "first": blocks[0],
        "last": blocks[-1],
        "peak": v["norm_sq_per_dim_max"],
        "peak_block": peak,
        "median": v["norm_sq_per_dim_median"],
        "ratio": v["norm_sq_per_dim_max"] / v["norm_sq_per_dim_median"]
        if v["norm_sq_per_dim_median"] > 0
        else math.inf,
        "count_min": min(counts),
        "count_max": max(counts),
        "tokens": int(v["tokens"]),
    }


def massive_sentence(finding: dict) -> str:
    """One line for one `massive_activations` finding, the same on the console and in the report:
    "decoder: massive activations at blocks 11-28 (18 of 30 blocks): 8 of 2048 tokens, peak
    ||h||^2/d 1.2e+06 at block 20, 3.6e+04x its median 33 (Sun et al. 2024: ...); transient:
    blocks 2-4 (9 of 2048 tokens, peak ||h||^2/d 4.73e+03 at block 2, 144x its median 33)"."""
    name = finding["stack"] + (
        "" if finding["stream"] in ("x", "-") else f" {finding['stream']} stream"
    )
    persistent, transient = finding["persistent"], finding["transient"]
    if not (persistent or transient):
        return f"{name}: no massive activations (no token's ||h||^2/d above {MASSIVE:g}x its block's median)"

    def span(r):
        return (
            f"block {r['first']}" if r["first"] == r["last"] else f"blocks {r['first']}-{r['last']}"
        )

    def count(r):
        n = (
            r["count_min"]
            if r["count_min"] == r["count_max"]
            else f"{r['count_min']}-{r['count_max']}"
        )
        return f"{n} of {r['tokens']} tokens"

    def size(r):
        return f"peak ||h||^2/d {r['peak']:.3g} at block {r['peak_block']}, {r['ratio']:.3g}x its median {r['median']:.3g}"

    if persistent:
        text = (
            "; ".join(
                f"massive activations at {span(r)} ({r['last'] - r['first'] + 1} of {finding['blocks']} blocks): "
                f"{count(r)}, {size(r)}"
                for r in persistent
            )
            + " (Sun et al. 2024: a few tokens, not the whole stream)"
        )
    else:
        text = (
            f"no persistent massive activations (none lasting {finding['persistent_from']} of "
            f"{finding['blocks']} blocks)"
        )
    if transient:
        text += "; transient: " + "; ".join(f"{span(r)} ({count(r)}, {size(r)})" for r in transient)
    return f"{name}: {text}"


def collapse_summary(label: str, rows: list[dict]) -> list[dict]:
    """Per (stack, stream) of one model's tidy rows: verdict and the most redundant blocks
    (highest adjacent cosine)."""
    out = []
    for (stack, stream), by_layer in rows_by_layer(
        r for r in rows if r["metric"] == "cos_adjacent"
    ).items():
        ranked = sorted(
            (k for k in by_layer if math.isfinite(by_layer[k])), key=lambda k: -by_layer[k]
        )
        out.append(
            {
                "model": label,
                "stack": stack,
                "stream": stream,
                **collapse_verdict(in_order(by_layer)),
                "redundant": [
                    {"layer": k, "cos_adjacent": by_layer[k]} for k in ranked[:REDUNDANT_SHOWN]
                ],
            }
        )
    return out


def inverse_sqrt_reference(values) -> np.ndarray:
    """The k^-1/2 shape (ResiDual's Pre-LN collapse rate) through the value at block k = 2:
    values (N,) per block k = 1..N -> values[1] * sqrt(2 / k). A reference line for the eye,
    anchored past block 1, which starts from the embedding rather than the steady state."""
    v = np.asarray(values, dtype=np.float64)
    k = np.arange(1, len(v) + 1)
    return v[1] * np.sqrt(2.0 / k)
