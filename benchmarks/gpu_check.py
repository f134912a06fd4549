"""The probe on a CUDA GPU, in a few minutes: overhead at a realistic size, host syncs, bf16 agreement.

    python benchmarks/gpu_check.py            # exits with one line when no CUDA device is present

1. Overhead: a decoder of 12 blocks, d 1024, 16 heads, FFN 4096, batch 4 x 512, bf16 autocast,
   AdamW; plain steps, steps with Probe(param_grad_norm, w2_grad_norm) and with every quantity
   (subsample 256 tokens), interleaved for --rounds rounds after warm-up; median step time and
   IQR per variant, ratios to plain (targets: both <= 1.03); `between` (param_grad_norm,
   w2_grad_norm, act_grad_norm: what the callbacks and `train` record between two
   forward-statistics steps) and the amortized ratio of their default schedule (one all_stats
   step in FORWARD_EVERY); kernel launches per block of one step of each variant
   (cudaLaunchKernel calls under torch.profiler, extra over plain).
2. Host syncs: after warm-up steps (the plan and index tensors are built once, on the first
   recorded step), `torch.cuda.set_sync_debug_mode("error")` around a full probed step: the
   forward and backward (all hooks) must raise nothing; `probe.step()` is then allowed exactly
   one synchronizing call (its device-to-host copy), checked by running it under "warn" mode
   and counting the warnings; with defer=True it must make none.
3. bf16 agreement: the same model and batch in float32 and under bf16 autocast + GradScaler
   (scaler passed to the probe): per-block parameter-gradient norms within 5 % of float32.

Prints one line per check and ends with `gpu_overhead_grad_norms`, `gpu_overhead_all_stats`,
`gpu_overhead_amortized`, `gpu_launches_per_block_grad_norms`, `gpu_launches_per_block_all_stats`,
`gpu_syncs_in_hooks`, `gpu_syncs_in_step`, `gpu_bf16_max_rel_diff`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = dict(
    arch="decoder",
    placement="pre-ln",
    depth=12,
    d_model=1024,
    heads=16,
    ffn=4096,
    vocab_size=32000,
    max_len=512,
)
BATCH, SEQ = 4, 512


def quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def setup(torch, dtype_model=None):
    from residual_probe.models import build_model

    torch.manual_seed(0)
    model = build_model(**CONFIG).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, CONFIG["vocab_size"], (BATCH, SEQ + 1), generator=g).cuda()
    return model, opt, seq[:, :-1], seq[:, 1:]


def loss_fn(torch, model, tok, tgt):
    import torch.nn.functional as F

    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tok)
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())


def overhead(torch, rounds: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Step times per variant (interleaved rounds) and the kernel launches of one profiled step each."""
    from torch.profiler import ProfilerActivity, profile

    from residual_probe.probe import Probe

    model, opt, tok, tgt = setup(torch)
    probes = {
        "plain": None,
        "grad_norms": Probe(model, quantities=("param_grad_norm", "w2_grad_norm"), keep_rows=False),
        "between": Probe(
            model, quantities=("param_grad_norm", "w2_grad_norm", "act_grad_norm"), keep_rows=False
        ),
        "all_stats": Probe(model, subsample_tokens=256, keep_rows=False),
    }

    def step(probe) -> float:
        if probe is not None:
            probe.attach()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(torch, model, tok, tgt).backward()
        if probe is not None:
            probe.step()
        opt.step()
        torch.cuda.synchronize()
        if probe is not None:
            probe.detach()
        return time.perf_counter() - t0

    times = {v: [] for v in probes}
    for r in range(warmup + rounds):
        for v, probe in probes.items():
            t = step(probe)
            if r >= warmup:
                times[v].append(t)
    launches = {}
    for v, probe in probes.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(probe)
        launches[v] = sum(e.name in ("cudaLaunchKernel", "cuLaunchKernel") for e in prof.events())
    return times, launches


def count_syncs(torch, fn) -> int:
    """Synchronizing CUDA calls made by fn(), counted from the sync-debug warnings."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def syncs(torch) -> tuple[int, int, int]:
    from residual_probe.probe import Probe

    model, opt, tok, tgt = setup(torch)
    out = []
    for defer in (False, True):
        probe = Probe(model, subsample_tokens=256, keep_rows=False, defer=defer).attach()
        for _ in range(2):  # warm-up: plans and index tensors are built on the first recorded step
            opt.zero_grad(set_to_none=True)
            loss_fn(torch, model, tok, tgt).backward()
            probe.step()
            opt.step()
        torch.cuda.synchronize()
        opt.zero_grad(set_to_none=True)
        torch.cuda.set_sync_debug_mode("error")
        hooks = 0
        try:
            loss = loss_fn(torch, model, tok, tgt)
            loss.backward()  # every forward and gradient hook runs here: any sync raises
        except RuntimeError as e:
            hooks = 1
            print(
                f"a host sync in the forward/backward with the probe attached: {e}".splitlines()[0]
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out.append(count_syncs(torch, probe.step))
        probe.detach()
    return (
        hooks,
        out[0],
        out[1],
    )  # hooks: of the last (defer=True) run; both runs use the same hooks


def bf16_agreement(torch) -> float:
    import torch.nn.functional as F

    from residual_probe.probe import Probe

    model, opt, tok, tgt = setup(torch)
    q = ("param_grad_norm",)
    probe = Probe(model, quantities=q)
    with probe:
        F.cross_entropy(model(tok).flatten(0, 1), tgt.flatten()).backward()
        ref = {(r["layer"], r["sublayer"]): r["value"] for r in probe.step() if r["metric"] in q}
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**14)
    probe = Probe(model, quantities=q, scaler=scaler)
    with probe:
        scaler.scale(loss_fn(torch, model, tok, tgt)).backward()
        got = {(r["layer"], r["sublayer"]): r["value"] for r in probe.step() if r["metric"] in q}
    return max(abs(got[k] - v) / v for k, v in ref.items() if v > 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
            file=sys.stderr,
        )
        return 2
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; decoder 12 x d 1024, batch {BATCH} x {SEQ}, "
        f"bf16 autocast, {args.rounds} rounds after {args.warmup} warm-up"
    )
    from residual_probe.probe.schedule import FORWARD_EVERY

    times, launches = overhead(torch, args.rounds, args.warmup)
    base = statistics.median(times["plain"])
    depth = CONFIG["depth"]
    for v, t in times.items():
        lo, med, hi = quartiles(t)
        print(
            f"{v:<11} median {1e3 * med:8.2f} ms  IQR {1e3 * lo:.2f}-{1e3 * hi:.2f} ms  ratio {med / base:.3f}  "
            f"kernel launches {launches[v]} (+{(launches[v] - launches['plain']) / depth:.1f} per block)"
        )
    ratio = {v: statistics.median(t) / base for v, t in times.items()}
    amortized = ((FORWARD_EVERY - 1) * ratio["between"] + ratio["all_stats"]) / FORWARD_EVERY
    hooks, step_syncs, deferred_syncs = syncs(torch)
    print(
        f"host syncs: hooks {hooks} (sync debug mode 'error' raised nothing), probe.step() {step_syncs}, "
        f"probe.step(defer=True) {deferred_syncs}"
    )
    rel = bf16_agreement(torch)
    print(
        f"bf16 autocast + GradScaler vs float32, per-block parameter-gradient norms: max relative difference {rel:.4f}"
    )
    print(f"gpu_overhead_grad_norms: {statistics.median(times['grad_norms']) / base:.4f}")
    print(f"gpu_overhead_all_stats: {statistics.median(times['all_stats']) / base:.4f}")
    print(
        f"gpu_overhead_amortized: {amortized:.4f} (forward statistics on 1 of {FORWARD_EVERY} recorded steps)"
    )
    for v in ("grad_norms", "all_stats"):
        print(f"gpu_launches_per_block_{v}: {(launches[v] - launches['plain']) / depth:.1f}")
    print(f"gpu_syncs_in_hooks: {hooks}")
    print(f"gpu_syncs_in_step: {step_syncs}")
    print(f"gpu_bf16_max_rel_diff: {rel:.4f}")
    ok = hooks == 0 and step_syncs <= 1 and deferred_syncs == 0 and rel < 0.05
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
