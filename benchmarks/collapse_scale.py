"""Cost of `collapse` on a ~135M-parameter, 30-layer decoder over 8k tokens, on 2 CPU threads.

Builds the model itself (random weights, SmolLM-135M-like sizes: d 576, 9 heads, FFN 1920,
vocab 49152, tied embeddings, Pre-LN), and runs, each in a fresh subprocess so peak memory
is clean:
- plain:    a no-grad forward of the model body over the same batches (no probe);
- collapse: the collapse measurement (probe hooks, forward statistics, token subsample,
            similarity/CKA/effective rank), i.e. `jobs.collapse.measure`.
Both load nothing and include one warm-up forward before timing. Memory is the peak RSS
(VmHWM, reset after warm-up) above the process's RSS before the model was built, so it is
weights plus whatever the run keeps; the plain run's peak is weights + one layer's activations.
Ends with `collapse_time_ratio: X` and `collapse_memory_ratio: Y`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(arch="decoder", placement="pre-ln", depth=30, d_model=576, heads=9, ffn=1920, vocab_size=49152,
             max_len=2048, tie_embeddings=True)
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
    from residual_probe.jobs.collapse import CollapseSpec, make_batches, measure
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
        measure(loaded, batches, spec)
    wall = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    print(json.dumps({"mode": mode, "wall_s": wall, "peak_kb": rss_kb("VmHWM") - base, "weights_kb": weights / 1024,
                      "params": loaded.parameters}))


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    plain, probed = run("plain"), run("collapse")
    print(f"model: {plain['params'] / 1e6:.1f}M parameters, {SIZES['depth']} layers, weights {plain['weights_kb'] / 1024:.0f} MiB")
    print(f"tokens: {TOKENS} in batches of {BATCH} x {SEQ}, 2 threads")
    print(f"plain forward:  {plain['wall_s']:.2f} s, peak {plain['peak_kb'] / 1024:.0f} MiB above start")
    print(f"collapse:       {probed['wall_s']:.2f} s, peak {probed['peak_kb'] / 1024:.0f} MiB above start")
    print(f"collapse_time_ratio: {probed['wall_s'] / plain['wall_s']:.3f}")
    print(f"collapse_memory_ratio: {probed['peak_kb'] / plain['peak_kb']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
