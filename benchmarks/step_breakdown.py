"""Where the probe's time goes inside a training step: each part timed in situ, in milliseconds.

The overhead ratio of `overhead.py` is the total; on a shared VM its noise (a few percent
from round to round) hides differences of 1 %. Here the probe's own functions are wrapped
with timers while the probed step runs (so each part is charged what it costs inside the
step, caches evicted by the model's matmuls included) and the medians over rounds are printed,
with the plain and probed step times (the wrappers add ~1 us a call to the probed one).

    python benchmarks/step_breakdown.py [--size default|realistic] [--rounds 12]

Parts: hook.forward (all forward hooks, of which fs.* forward statistics, sub.forward the
subsample, ag.register registering gradient hooks), ag.on_grad (gradient hooks, of which
ag.flush the batched norms), probe.step (of which step.grad_squares the parameter-gradient norms).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from depth_scale import timed_step

from residual_probe.models import build_model
from residual_probe.probe import Probe
from residual_probe.probe import params as PA
from residual_probe.probe import probe as P
from residual_probe.probe.quantities import act_grad_norm as AG
from residual_probe.probe.quantities import forward_stats as FS
from residual_probe.probe.quantities import subsample as SU

SIZES = {
    "default": (dict(depth=48, d_model=256, heads=4, ffn=1024), (8, 32)),
    "realistic": (dict(depth=12, d_model=1024, heads=16, ffn=4096), (4, 512)),
}
PARTS = [
    (P.Probe, "_on_forward", "hook.forward"),
    (FS.ForwardStats, "forward", "fs.forward"),
    (FS.Chain, "_push", "fs.chain_push"),
    (FS.Chain, "flush", "fs.chain_flush"),
    (FS.ForwardStats, "_reduce", "fs.reduce"),
    (SU.Subsample, "forward", "sub.forward"),
    (AG.ActGradNorm, "forward", "ag.register"),
    (AG.ActGradNorm, "_on_grad", "ag.on_grad"),
    (AG.ActGradNorm, "_flush", "ag.flush"),
    (P.Probe, "step", "probe.step"),
    (PA.ParamPlan, "grad_squares", "step.grad_squares"),
]
spent: dict[str, float] = {}


def timed(f, label):
    @functools.wraps(f)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="default")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for cls, name, label in PARTS:
        setattr(cls, name, timed(getattr(cls, name), label))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, (batch, seq) = SIZES[args.size]
    model = build_model(arch="decoder", placement="pre-ln", vocab_size=256, max_len=512, **cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = torch.randint(1, 256, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    tok, tgt = data[:, :-1], data[:, 1:]
    probe = Probe(model, subsample_tokens=256, keep_rows=False)
    steps, parts = {"plain": [], "probed": []}, []
    for r in range(args.rounds + 1):  # the first round warms up
        for probed in (False, True):
            spent.clear()
            dt = timed_step(model, opt, tok, tgt, probe if probed else None)
            if r:
                steps["probed" if probed else "plain"].append(dt)
                if probed:
                    parts.append(dict(spent))
    plain = statistics.median(steps["plain"])
    print(
        f"{args.size}: {cfg}, batch {batch} x {seq}, {args.threads} threads; medians of {args.rounds} rounds"
    )
    print(
        f"plain step {1e3 * plain:.1f} ms, probed step {1e3 * statistics.median(steps['probed']):.1f} ms"
    )
    for _, _, label in PARTS:
        print(f"{label:<18} {1e3 * statistics.median(p.get(label, 0.0) for p in parts):8.2f} ms")
    total = statistics.median(
        sum(p.get(k, 0.0) for k in ("hook.forward", "ag.on_grad", "probe.step")) for p in parts
    )
    print(f"probe_work_ms: {1e3 * total:.1f}")
    print(f"probe_work_share: {total / plain:.4f}")


if __name__ == "__main__":
    main()
