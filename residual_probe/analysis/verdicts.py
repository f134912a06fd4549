"""Every verdict the toolkit gives, decided once: the thresholds, the decision and its sentence.

The console, the report, the summaries, the studies' checks and the callbacks render what these
functions return; none of them compares a number with a threshold of its own.

Gradients: block 0's gradient norm over the last block's (`curves.first_over_last`). Below
1/VANISHING_FACTOR (0.1) gradients vanish toward the input, the Post-LN failure (Xiong et al. 2020);
above VANISHING_FACTOR they grow; within BALANCED_FACTOR either way the profile is balanced.

Collapse: the adjacent cosine cos(h_{k-1}, h_k) of the last third of the blocks. A block whose
output keeps cos >= COLLAPSED_COS (0.98) with its input turns the representation by under 11
degrees: ShortGPT removes such blocks with little loss. "collapsing": later blocks change the stream
less than COLLAPSING_RATIO (half) as much as early ones, the Pre-LN signature (cos_k ~
sqrt(k / (k + 1)) in the toy model).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fits import DecayFit

VANISHING_FACTOR = 10.0  # a first/last ratio beyond 10x either way is named vanishing or growing
VANISHING_RATIO = 1 / VANISHING_FACTOR  # first/last below this: gradients vanish
BALANCED_FACTOR = 2.0  # within 2x either way is balanced; between 2x and 10x, decaying or rising

COLLAPSED_COS, COLLAPSING_COS, COLLAPSING_RATIO = 0.98, 0.9, 0.5
SEVERITY = ("collapsed", "collapsing", "no collapse")  # most severe first


def stream_name(stack: str, stream: str, always: bool = False) -> str:
    """A residual stream in words: "decoder" for a stack's one stream, "decoder d stream" for
    ResiDual's second; `always` names the x stream too ("decoder x stream", where both are shown)."""
    if stream in ("x", "-", "") and not always:
        return stack
    return f"{stack} {stream} stream"


# ---- gradients -----------------------------------------------------------------------------------


def is_vanishing(first_over_last: float) -> bool:
    """Whether block 0's gradient norm over the last block's says gradients vanish toward the input."""
    return first_over_last < VANISHING_RATIO


def decay_verdict(
    fit: DecayFit,
    n_layers: int,
    factor: float = VANISHING_FACTOR,
    balanced: float = BALANCED_FACTOR,
) -> str:
    """One sentence on a per-layer gradient profile, quoting the numbers it rests on and its thresholds:
    vanishing (< 1/factor), decaying (< 1/balanced), balanced, rising (> balanced), growing (> factor),
    from block 0's norm over the last block's (geometric mean over seeds) and the fitted rate."""
    last = n_layers - 1
    ratio = fit.first_over_last
    interval = f"{fit.rate:.3g} per block" + (
        f" [{fit.low:.3g}, {fit.high:.3g}]" if fit.seeds > 1 else ""
    )
    if ratio < 1 / factor:
        head, band = "gradients vanish toward the input", f"vanishing: below {1 / factor:g}x"
    elif ratio < 1 / balanced:
        head, band = (
            "gradients decay toward the input",
            f"decaying: {1 / factor:g}x to {1 / balanced:g}x",
        )
    elif ratio <= balanced:
        head, band = "balanced", f"balanced: {1 / balanced:g}x to {balanced:g}x"
    elif ratio <= factor:
        head, band = "gradients rise toward the input", f"rising: {balanced:g}x to {factor:g}x"
    else:
        head, band = "gradients grow toward the input", f"growing: above {factor:g}x"
    return f"{head}: block 0 gets {ratio:.3g}x block {last}'s norm ({band}), {interval}"


# ---- collapse ------------------------------------------------------------------------------------


def collapse_verdict(cos: list[float]) -> dict:
    """Collapse verdict of one stream from its per-block adjacent cosines (block order):
    {"verdict", "late_cos_adjacent", "late_over_early_influence", "basis", "blocks", "late_from"} (late:
    blocks late_from.. onward, the last third; basis: the numbers and thresholds in words)."""
    finite = [c for c in cos if math.isfinite(c)]
    if not finite:
        return {"verdict": "unknown (no finite cosines)"}
    third = max(1, len(cos) // 3)
    early, late = cos[:third], cos[-third:]
    late_cos = sum(late) / len(late)
    early_inf = sum(1 - c for c in early) / len(early)
    late_inf = sum(1 - c for c in late) / len(late)
    ratio = late_inf / early_inf if early_inf > 0 else math.inf
    if late_cos >= COLLAPSED_COS:
        v = "collapsed"
    elif late_cos >= COLLAPSING_COS and ratio < COLLAPSING_RATIO:
        v = "collapsing"
    else:
        v = "no collapse"
    # the numbers the verdict rests on, beside the thresholds they were compared with
    basis = (
        f"last {third} of {len(cos)} blocks: adjacent cos {late_cos:.4f}, influence {ratio:.2f}x the first "
        f"{third}'s; collapsed if cos >= {COLLAPSED_COS}, collapsing if cos >= {COLLAPSING_COS} and "
        f"influence < {COLLAPSING_RATIO}x"
    )
    if len(cos) < 6:
        basis += f"; {len(cos)} blocks are few to judge a trend"
    return {
        "verdict": v,
        "late_cos_adjacent": late_cos,
        "late_over_early_influence": ratio,
        "basis": basis,
        "blocks": len(cos),
        "late_from": len(cos) - third,
    }


def collapse_sentence(stream: dict) -> str:
    """Plain-language line for one stream's collapse verdict (`collapse_verdict` output)."""
    cos = stream.get("late_cos_adjacent", math.nan)
    n = stream.get("blocks")
    if n and "late_from" in stream:
        late = (
            f"block {n - 1}"
            if stream["late_from"] == n - 1
            else f"blocks {stream['late_from']}-{n - 1}"
        )
    else:
        late = "the last third of the blocks"
    v = stream["verdict"]
    one = late.startswith("block ")  # "block 3 changes", "blocks 2-3 change"
    if v == "collapsed":
        return f"{late} {'barely changes' if one else 'barely change'} the representation: adjacent cosine {cos:.3f}"
    if v == "collapsing":
        return (
            f"{late}: the representation changes less and less: adjacent cosine {cos:.3f}, "
            f"{stream['late_over_early_influence']:.2f} of the early blocks' influence"
        )
    if v == "no collapse":
        return (
            f"no collapse: {late} still {'changes' if one else 'change'} the representation "
            f"(adjacent cosine {cos:.3f})"
        )
    return v


def late_cos(cos: list[float]) -> float:
    """The late-block adjacent cosine the collapse verdict rests on (NaN without finite cosines)."""
    return float(collapse_verdict(cos).get("late_cos_adjacent", math.nan))


def collapse_change(cos_start: list[float], cos_now: list[float], start_step: int) -> str:
    """How the late-block adjacent cosine moved since the first recorded step, in words:
    "down from 0.990 at step 0" (a verdict during training is relative to where the run began)."""
    a, b = late_cos(cos_start), late_cos(cos_now)
    if not (math.isfinite(a) and math.isfinite(b)):
        return ""
    way = "up" if b > a else "down" if b < a else "unchanged"
    return (
        f"{way} from {a:.4f} at step {start_step}"
        if way != "unchanged"
        else f"unchanged since step {start_step}"
    )


def overall_verdict(summary: list[dict]) -> str:
    """The most severe verdict over all of a model's streams (ResiDual's d stream included: it is
    Pre-LN by design, and the model's output reads it through LN_f)."""
    found = [s["verdict"] for s in summary if s["verdict"] in SEVERITY]
    return min(found, key=SEVERITY.index) if found else "unknown"


def overall_detail(summary: list[dict]) -> str:
    """Which streams the overall verdict comes from, e.g. "decoder d stream; worst of 2 streams"."""
    worst = overall_verdict(summary)
    names = [stream_name(s["stack"], s["stream"]) for s in summary if s["verdict"] == worst]
    return f"{', '.join(names) or 'no stream'}; worst of {len(summary)} stream{'s' if len(summary) != 1 else ''}"


def thresholds_text(ge: str = ">=") -> str:
    """The thresholds in one sentence, for a reader of the verdicts (the report's footnote)."""
    return (
        f"gradients vanish when block 0's norm is under 1/{VANISHING_FACTOR:g} of the last block's; "
        "collapse from the adjacent cosine of the last third of the blocks (collapsed "
        f"{ge} {COLLAPSED_COS:g}; collapsing {ge} {COLLAPSING_COS:g} with under "
        f"{'half' if COLLAPSING_RATIO == 0.5 else f'{COLLAPSING_RATIO:g}x'} the early blocks' influence)"
    )
