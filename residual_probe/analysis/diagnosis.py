"""Verdicts on one checkpoint's gradient profile, in numbers and plain language.

From the whole-block gradient norms g_0..g_{N-1} of one stack (one gradient, one model):
- first/last = g_0 / g_{N-1} and the per-block rate r come from `fits.geometric_decay` (the one
  first/last ratio and the one decay fit), the verdict and its sentence from `verdicts` (vanishing
  when first/last < 1/10, growing when > 10, else balanced);
- first/median = g_0 / median(g): robust to an unusual last block (a final norm's gradient);
- r's interval: one model has no seeds to resample, so the 95 % interval is the least-squares
  slope's t-interval over blocks (scipy.stats.linregress standard error, N - 2 degrees of
  freedom): it says how well one geometric rate describes the profile, not run-to-run spread.
"""

from __future__ import annotations

import math

import numpy as np

from .rows import by_layer, in_order

LEVEL = 0.95


def rate_interval(norms, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) of the per-block factor r = g_{k-1} / g_k from the slope's t-interval; nan with < 3 blocks."""
    from scipy import stats

    y = np.log(np.asarray(norms, dtype=np.float64))
    if y.size < 3:
        return math.nan, math.nan
    fit = stats.linregress(np.arange(y.size, dtype=np.float64), y)
    t = stats.t.ppf(0.5 + level / 2, y.size - 2)
    lo_slope, hi_slope = fit.slope - t * fit.stderr, fit.slope + t * fit.stderr
    return float(np.exp(-hi_slope)), float(np.exp(-lo_slope))


def gradient_verdict(norms) -> dict:
    """Numbers and sentence for one stack's per-block gradient norms (block order)."""
    from .fits import FitError, geometric_decay
    from .verdicts import decay_verdict, is_vanishing

    g = np.asarray(norms, dtype=np.float64)
    out = {"blocks": int(g.size)}
    bad = [k for k, v in enumerate(g) if not (math.isfinite(v) and v > 0)]
    if bad:  # a NaN/inf or zero norm: no ratio or rate is defined; name the blocks
        return {
            **out,
            "vanishing": None,
            "first_over_last": math.nan,
            "rate": math.nan,
            "verdict": f"unknown: blocks {', '.join(map(str, bad[:5]))} have non-finite or zero gradient norms",
        }
    try:
        fit = geometric_decay(g)
    except FitError as exc:
        return {
            **out,
            "vanishing": None,
            "first_over_last": math.nan,
            "rate": math.nan,
            "verdict": f"not fitted: {exc}",
        }
    low, high = rate_interval(g)
    out.update(
        first_over_last=fit.first_over_last,
        first_over_median=float(g[0] / np.median(g)),
        rate=fit.rate,
        rate_low=low,
        rate_high=high,
        vanishing=is_vanishing(fit.first_over_last),
    )
    sentence = decay_verdict(fit, g.size)
    if math.isfinite(low):
        sentence += f" ({LEVEL:.0%} interval [{low:.3g}, {high:.3g}] over blocks)"
    out["verdict"] = sentence + f"; first/median {out['first_over_median']:.3g}"
    return out


def loss_warnings(mean_loss: float, vocab: int, family: str) -> list[str]:
    """Warnings about what the gradients describe: a mean loss at or above ln(V), the loss of a
    uniform guess over the vocabulary, means the model does not predict this text (usually the
    text was tokenized otherwise than the model was trained), so its gradients describe a model
    far from its data."""
    if not (vocab > 1 and math.isfinite(mean_loss)) or mean_loss < math.log(vocab):
        return (
            []
            if math.isfinite(mean_loss)
            else [f"the mean loss is {mean_loss}: the gradients are not usable"]
        )
    hint = (
        " (fairseq: pass --dict with the model's dictionary)"
        if family.startswith("fairseq")
        else ""
    )
    return [
        f"the model does not predict this text: mean loss {mean_loss:.2f} nats is at or above ln({vocab}) = "
        f"{math.log(vocab):.2f}, a uniform guess; the gradients describe a model far from its data, usually a "
        f"tokenization mismatch{hint}"
    ]


def whole_model_norms(rows: list[dict]) -> dict[str, float]:
    """{part: norm} of one model's grad_norms.csv-style rows: the parts outside the blocks, "blocks"
    (the root sum of squares of every block's norm) and "total" (clip_grad_norm_'s norm)."""
    out = {r["sublayer"]: float(r["param_grad_norm"]) for r in rows if r["stack"] == "model"}
    blocks = [
        float(r["param_grad_norm"])
        for r in rows
        if r["sublayer"] == "block" and r["stack"] != "model"
    ]
    if blocks:
        out["blocks"] = math.sqrt(sum(v * v for v in blocks))
    order = ("embedding", "embedding_norm", "blocks", "final_norm", "head", "other", "total")
    return {k: out[k] for k in order if k in out}


def gradient_by_part(model: dict) -> str:
    """One grad_norms.json model entry's gradient norm by part, in words, the same on the console
    and in the report: "embedding 10.4, embedding_norm 0.405, blocks 1.34, total 10.5; no gradient
    (not used by this loss): other (pooler.dense.weight, pooler.dense.bias)". A part the loss does
    not reach has no norm, not a NaN one."""
    text = ", ".join(f"{k} {v:.4g}" for k, v in (model.get("whole_model") or {}).items())
    unused = model.get("no_gradient") or {}
    if unused:
        text += "; no gradient (not used by this loss): " + ", ".join(
            f"{part} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
            for part, names in unused.items()
        )
    return text


def gradient_verdicts(rows: list[dict]) -> list[dict]:
    """One verdict per (model, stack) from grad_norms.csv-style rows (sublayer == "block")."""
    blocks = (r for r in rows if r["sublayer"] == "block" and r["stack"] != "model")
    series = by_layer(blocks, keys=("model", "stack"), value="param_grad_norm")
    return [
        {"model": m, "stack": s, **gradient_verdict(in_order(v))} for (m, s), v in series.items()
    ]
