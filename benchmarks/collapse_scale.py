"""Cost of `collapse` on a ~135M-parameter, 30-layer decoder over 8k tokens, on 2 CPU threads.

Builds the model itself (random weights, SmolLM-135M-like sizes: d 576, 9 heads, FFN 1920,
vocab 49152, tied embeddings, Pre-LN), and runs, each in a fresh subprocess so peak memory
is clean:
- plain:    a no-grad forward of the model body over the same batches (no probe);
- collapse: the collapse measurement (probe hooks, forward statistics, token subsample,
            similarity/CKA/effective rank), i.e. `jobs.collapse.measure_forward`.
Both load nothing and include one warm-up forward before timing. Memory is the peak RSS
(VmHWM, reset after warm-up) above the process's RSS before the model was built, so it is
weights plus whatever the run keeps; the plain run's peak is weights + one layer's activations.
Each mode runs `--runs` times (default 3), alternating, and the ratios are of the medians; every
run's numbers are printed, so a bimodal peak shows.

Allocator: the children run with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=1 MiB)
and one malloc arena (MALLOC_ARENA_MAX=1) unless `--default-malloc`. With the default dynamic
threshold, freeing one large block raises the threshold (up to 32 MiB), after which the
per-layer activations (5-16 MiB here) are served from per-thread arenas that keep freed
memory; whether that happens in a run depends on thread timing, which is a candidate for the
two modes of peak memory seen before (663-691 vs 1545-1680 MiB). `--default-malloc` reruns
with the default allocator settings to compare.
Ends with `collapse_time_ratio: X` and `collapse_memory_ratio: Y`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(
    arch="decoder",
    placement="pre-ln",
    depth=30,
    d_model=576,
    heads=9,
    ffn=1920,
    vocab_size=49152,
    max_len=2048,
    tie_embeddings=True,
)
TOKENS, BATCH, SEQ = 8192, 8, 256


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(2)
    from residual_probe.checkpoints.loaded import ours
    from residual_probe.checkpoints.text import read_text
    from residual_probe.jobs.collapse import CollapseSpec, make_batches, measure_forward
    from residual_probe.models import ModelConfig, build_model

    base = rss_kb("VmRSS")
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SIZES)).eval()
    loaded = ours(model, "benchmark", "random weights")
    spec = CollapseSpec(ckpts=("-",), tokens=TOKENS, batch=BATCH, seq_len=SEQ)
    batches, _ = make_batches(loaded, spec, read_text(None)[0])
    with torch.no_grad():
        loaded.forward(batches[0])  # warm-up: allocator and kernels
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    if mode == "plain":
        with torch.no_grad():
            for x in batches:
                loaded.forward(x)
    else:
        measure_forward(loaded, batches, spec)
    wall = time.perf_counter() - t0
    weights = sum(
        p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
    )
    print(
        json.dumps(
            {
                "mode": mode,
                "wall_seconds": wall,
                "peak_kb": rss_kb("VmHWM") - base,
                "weights_kb": weights / 1024,
                "params": loaded.parameters,
            }
        )
    )


MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_ARENA_MAX": "1"}


def run(mode: str, default_malloc: bool) -> dict:
    env = dict(os.environ) if default_malloc else {**os.environ, **MALLOC}
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--runs", type=int, default=3, help="runs of each mode (alternating); medians are compared"
    )
    ap.add_argument(
        "--default-malloc", action="store_true", help="glibc's default (dynamic) allocator settings"
    )
    args = ap.parse_args()
    runs = {"plain": [], "collapse": []}
    for _ in range(args.runs):
        for mode in runs:
            runs[mode].append(run(mode, args.default_malloc))
    plain = runs["plain"][0]
    print(
        f"model: {plain['params'] / 1e6:.1f}M parameters, {SIZES['depth']} layers, weights {plain['weights_kb'] / 1024:.0f} MiB"
    )
    print(
        f"tokens: {TOKENS} in batches of {BATCH} x {SEQ}, 2 threads, "
        f"{'default malloc' if args.default_malloc else 'mmap threshold 1 MiB, one arena'}; {args.runs} runs each"
    )
    med = {}
    for mode, rs in runs.items():
        wall, peak = [r["wall_seconds"] for r in rs], [r["peak_kb"] / 1024 for r in rs]
        med[mode] = (statistics.median(wall), statistics.median(peak))
        print(
            f"{mode:<9} wall s {' '.join(f'{w:.2f}' for w in wall)} (median {med[mode][0]:.2f}); "
            f"peak MiB above start {' '.join(f'{p:.0f}' for p in peak)} (median {med[mode][1]:.0f})"
        )
    print(f"collapse_time_ratio: {med['collapse'][0] / med['plain'][0]:.3f}")
    print(f"collapse_memory_ratio: {med['collapse'][1] / med['plain'][1]:.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
