"""How a probed training step scales with depth: decoder d 64, depths 48 ... 1000, with and without the probe.

For each depth, in a fresh subprocess (clean peak memory): a decoder-only Pre-LN model
(d 64, 2 heads, FFN 256, vocab 256), batch 4 x 32, Adam, 2 threads; `--rounds` interleaved
steps plain / probed (every quantity, subsample 64 tokens), median step time of each, and the
peak RSS above the RSS before the first step (the step's working memory) of a separate run of
each. Then a least-squares fit of log(value) on log(depth) per series: time and memory should
grow linearly (exponent ~1) with and without the probe, and the probed/plain time ratio must
not grow with depth (exponent ~0).

    python benchmarks/depth_scale.py [--depths 48 96 192 384 768 1000] [--rounds 7]

Ends with `time_exponent_plain`, `time_exponent_probe`, `memory_exponent_plain`,
`memory_exponent_probe`, `ratio_exponent`.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = (48, 96, 192, 384, 768, 1000)
BATCH, SEQ = 4, 32


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def timed_step(model, opt, tok, tgt, probe=None) -> float:
    """Seconds of one Adam step on next-token cross-entropy. With `probe`, it is attached for this
    step only, so plain and probed steps alternate on one model; attaching is not timed."""
    import torch.nn.functional as F

    if probe is not None:
        probe.attach()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(tok).flatten(0, 1), tgt.flatten()).backward()
    if probe is not None:
        probe.step()
    opt.step()
    dt = time.perf_counter() - t0
    if probe is not None:
        probe.detach()
    return dt


def child(depth: int, rounds: int, mode: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from residual_probe.models import build_model
    from residual_probe.probe import Probe

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_model(
        arch="decoder",
        placement="pre-ln",
        depth=depth,
        d_model=64,
        heads=2,
        ffn=256,
        vocab_size=256,
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    seq = torch.randint(1, 256, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    tok, tgt = seq[:, :-1], seq[:, 1:]
    probe = Probe(model, subsample_tokens=64, keep_rows=False)

    def step(probed: bool) -> float:
        return timed_step(model, opt, tok, tgt, probe if probed else None)

    if mode == "time":
        step(False), step(True)  # warm-up
        times = {"plain": [], "probe": []}
        for _ in range(rounds):
            times["plain"].append(step(False))
            times["probe"].append(step(True))
        print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
    else:
        before = rss()
        for _ in range(2):
            step(mode == "probe")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"step_bytes": peak - before}))


def run(*args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> str:
    """Fitted exponent of y ~ x^b (least squares on logs, scipy) with its standard error."""
    from scipy.stats import linregress

    fit = linregress([math.log(x) for x in xs], [math.log(y) for y in ys])
    return f"{fit.slope:.3f} (se {fit.stderr:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), int(args.child[1]), args.child[2])
        return
    print(
        f"decoder d 64, heads 2, FFN 256, batch {BATCH} x {SEQ}, 2 threads; median of {args.rounds} interleaved steps"
    )
    print(
        f"{'depth':>6} {'plain s':>9} {'probe s':>9} {'ratio':>7} {'plain MiB':>10} {'probe MiB':>10} {'mem ratio':>10}"
    )
    rows = []
    for depth in args.depths:
        t = run(depth, args.rounds, "time")
        mp, mq = run(depth, 0, "plain")["step_bytes"], run(depth, 0, "probe")["step_bytes"]
        rows.append((depth, t["plain"], t["probe"], mp, mq))
        print(
            f"{depth:>6} {t['plain']:>9.4f} {t['probe']:>9.4f} {t['probe'] / t['plain']:>7.3f} {mp / 2**20:>10.1f} "
            f"{mq / 2**20:>10.1f} {mq / mp:>10.3f}",
            flush=True,
        )
    d = [r[0] for r in rows]
    print(f"time_exponent_plain: {slope(d, [r[1] for r in rows])}")
    print(f"time_exponent_probe: {slope(d, [r[2] for r in rows])}")
    print(f"memory_exponent_plain: {slope(d, [max(r[3], 1) for r in rows])}")
    print(f"memory_exponent_probe: {slope(d, [max(r[4], 1) for r in rows])}")
    print(f"ratio_exponent: {slope(d, [r[2] / r[1] for r in rows])}")


if __name__ == "__main__":
    main()
