"""Overhead of the probe on a training step, as ratios to a plain step measured in the same run.

Setting (issue 3): decoder-only, depth 48, d_model 256, 4 heads, ffn 1024, batch 8, seq 32,
2 CPU threads, Adam. Variants, each a full step (zero_grad, forward, backward, record, Adam):

  plain          no measurement
  grad_norms     Probe(param_grad_norm, w2_grad_norm): foreach norms at probe.step() (blocks, the
                 parts outside them and the total)
  tensor_norms   (with --variants) grad_norms plus param_tensor_norm: a row per parameter tensor
  all_stats      Probe(every quantity): + act_grad_norm hooks, forward statistics, 256-token subsample
  between        Probe(param_grad_norm, w2_grad_norm, act_grad_norm): what the callbacks and `train`
                 record on the steps between two forward-statistics steps (schedule.FORWARD_EVERY)
  attention      between plus attn_logits and output_logits (issue 32): what `train` records on
                 every recorded step for the precursor warnings; the callbacks record both on the
                 forward statistics' schedule only, so they are in all_stats (the default
                 quantities); attn_logits is also timed alone with --variants attn_logits
  per_param      Lightning-style grad_norm: a Python loop over every parameter's .grad, .item() each
  act_cache      activation-cache style: every block submodule's full output cloned, stats after

Time: the variants run interleaved, round after round, and each reports its median step time
(other work on the machine drifts less into one variant than another). In each round every
variant takes a turn of `--turn` steps (default 2) of which only the last is timed, so what
the previous variant left behind (allocator state, evicted caches) is not charged to it; the
order rotates from round to round. Each recorder is built
once, as in a real loop, and attached only around its own variant's step. Memory: each variant
runs alone in a fresh subprocess; peak RSS (ru_maxrss) over the whole process, and the step's
own working memory (peak minus RSS before the first step, i.e. beyond model, data and imports).

`--size realistic`: decoder of 12 blocks, d 1024, 16 heads, FFN 4096, batch 4 x 512 (plain,
grad_norms and all_stats only; on 2 CPU threads a step takes tens of seconds, so give fewer
rounds, or run benchmarks/gpu_check.py on a GPU).

`--breakdown` adds timed variants, each forward quantity of all_stats alone (forward_stats,
act_grad_norm, subsample, attn_logits); gradient norms are the grad_norms variant.

Bounded state: a probe with include_eval=True over `--forwards` no-grad forwards of a small
decoder between two steps; prints the probe's state bytes after the first forward and after
the last (equal when pending state is preallocated buffers of fixed size, not one entry per forward).

Each variant's line gives the median step time and its interquartile range over the rounds, the
ratio of medians, and the paired ratio: the median (and IQR) of the per-round ratios to the plain
step of the same round. The headline `*_ratio` lines are the paired ratios, the median over the
rounds of each round's ratio, as the target is stated ("the median of at least 20 interleaved
rounds, printed with the interquartile range"): on this shared 2-core VM the machine switches
between a fast and a slow state (a plain step 0.51 or 0.65 s, for tens of seconds at a time), so
each variant's median step lands in one state or the other and the ratio of medians jumps (1.080
against a paired 1.053 in one run), while a round's variants share a state.
`amortized_ratio` is what the callbacks cost per recorded step with their default schedule:
(FORWARD_EVERY - 1) steps of `between` and one of `all_stats`, from the paired ratios (the
issue-32 quantities are in all_stats); `amortized_ratio_train` is `train`'s default, `attention`
in place of `between`.

Kernel launches: one step of each variant under torch.profiler; the extra launches over the
plain step, per block. On a GPU these are cudaLaunchKernel calls; on the CPU, top-level ATen
operator calls (each runs its kernel inline): the count that makes a small step slow on a GPU,
tracked on every machine.

The last lines are machine-readable: grad_norms_ratio, all_stats_ratio (paired medians), their
_iqr and _ratio_of_medians twins, memory_ratio (all_stats peak RSS over plain peak RSS),
state_bytes_before, state_bytes_after.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from residual_probe.analysis import metrics
from residual_probe.models import build_model
from residual_probe.probe import Probe, find_blocks
from residual_probe.probe.schedule import FORWARD_EVERY

VARIANTS = ("plain", "grad_norms", "between", "attention", "all_stats", "per_param", "act_cache")
BETWEEN = ("param_grad_norm", "w2_grad_norm", "act_grad_norm")
BREAKDOWN = {
    "forward_stats": ("forward_stats",),
    "act_grad_norm": ("act_grad_norm",),
    "subsample": ("subsample",),
    "attn_logits": ("attn_logits",),  # attention logits and entropy per block, alone
    "hc_mixing": ("hc_mixing",),  # hyper-connections' mixing error and gain (--placement hc/mhc)
    # the gradient norms with a row per parameter tensor too (param_tensor_norm, off by default)
    "tensor_norms": ("param_grad_norm", "w2_grad_norm", "param_tensor_norm"),
}
SIZES = {
    "default": (
        dict(
            arch="decoder",
            placement="pre-ln",
            depth=48,
            d_model=256,
            heads=4,
            ffn=1024,
            vocab_size=256,
        ),
        (8, 32),
    ),
    "realistic": (
        dict(
            arch="decoder",
            placement="pre-ln",
            depth=12,
            d_model=1024,
            heads=16,
            ffn=4096,
            vocab_size=256,
            max_len=512,
        ),
        (4, 512),
    ),
}
CONFIG, (BATCH, SEQ) = SIZES["default"]


def setup(depth: int):
    torch.manual_seed(0)
    model = build_model(**{**CONFIG, "depth": depth})
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, CONFIG["vocab_size"], (BATCH, SEQ + 1), generator=g)
    return model, opt, seq[:, :-1], seq[:, 1:]


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def bounded_state(forwards: int) -> tuple[int, int]:
    """Probe state bytes after 1 and after `forwards` no-grad forwards (include_eval=True) between two steps."""
    torch.manual_seed(0)
    model = build_model(
        arch="decoder", placement="pre-ln", depth=4, d_model=64, heads=2, ffn=128, vocab_size=256
    )
    tok = torch.randint(1, 256, (1, 8))
    probe = Probe(
        model,
        quantities=("forward_stats", "act_grad_norm", "subsample"),
        include_eval=True,
        subsample_tokens=8,
        keep_rows=False,
    )
    with probe, torch.no_grad():
        model(tok)
        before = probe.state_bytes()
        for _ in range(forwards - 1):
            model(tok)
        after = probe.state_bytes()
        probe.step()
    return before, after


class PerParamLoop:
    """What Lightning's `grad_norm` does: one norm per parameter in Python, each logged as a float."""

    def __init__(self, model):
        self.named = list(model.named_parameters())
        self.log = {}

    def step(self):
        norms = {n: p.grad.norm(2) for n, p in self.named if p.grad is not None}
        self.log = {n: v.item() for n, v in norms.items()}


class ActivationCache:
    """What activation caches do: keep every block submodule's full output, compute stats afterwards."""

    def __init__(self, model):
        self.blocks = find_blocks(model)
        self.cache, self.handles = {}, []
        self.attach()

    def attach(self):
        for b in self.blocks:
            for name, mod in b.module.named_modules(prefix=b.name):
                self.handles.append(mod.register_forward_hook(self._keep(name)))
            self.handles.append(b.module.register_forward_pre_hook(self._keep_input(b.name)))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    detach = remove

    def _keep(self, name):
        def hook(mod, args, out):
            if isinstance(out, torch.Tensor):
                self.cache[name] = out.detach().clone()

        return hook

    def _keep_input(self, name):
        def hook(mod, args):
            self.cache[name + ".input"] = args[0].detach().clone()

        return hook

    def step(self):
        stats = []
        for b in self.blocks:
            prev, cur = self.cache[b.name + ".input"], self.cache[b.name]
            stats += [
                metrics.cos_adjacent(prev, cur),
                metrics.relative_update(prev, cur),
                metrics.norm_sq_per_dim(cur),
                metrics.ln_update(prev, cur),
            ]
        values = torch.stack(stats).tolist()
        self.cache.clear()
        return values


def make_recorder(variant: str, model):
    if variant == "grad_norms":
        return Probe(
            model, quantities=("param_grad_norm", "w2_grad_norm"), keep_rows=False
        ).attach()
    if variant == "between":
        return Probe(model, quantities=BETWEEN, keep_rows=False).attach()
    if variant == "attention":
        extra = ("attn_logits", "output_logits")
        return Probe(model, quantities=BETWEEN + extra, keep_rows=False).attach()
    if variant == "all_stats":
        return Probe(model, subsample_tokens=256, keep_rows=False).attach()
    if variant in BREAKDOWN:  # one forward quantity alone (--breakdown)
        return Probe(
            model, quantities=BREAKDOWN[variant], subsample_tokens=256, keep_rows=False
        ).attach()
    if variant == "per_param":
        return PerParamLoop(model)
    if variant == "act_cache":
        return ActivationCache(model)
    return None


def train_step(model, opt, tok, tgt, recorder) -> float:
    """One step; returns the seconds spent in the recorder's step() (after backward)."""
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(tok).flatten(0, 1), tgt.flatten())
    loss.backward()
    t0 = time.perf_counter()
    if recorder is not None:
        recorder.step()
    recorded = time.perf_counter() - t0
    opt.step()
    return recorded


def time_variants(depth: int, rounds: int, warmup: int, variants=VARIANTS, turn: int = 2):
    """Step times and record-only times (the step() after backward): all variants, interleaved.

    Each recorder is built once, as in a real loop (the probe's plan is built at construction),
    and attached only around its own variant's turn, so no variant runs another's hooks. A turn
    is `turn` steps of one variant, of which only the last is timed: the untimed steps absorb
    what the previous variant left behind (allocator state, caches; caching every activation
    leaves the next step page faults), so the timed step is the steady state a training loop
    sees. The order of the variants rotates from round to round."""
    model, opt, tok, tgt = setup(depth)
    recorders = {}
    for v in variants:
        rec = recorders[v] = make_recorder(v, model)
        if isinstance(rec, (Probe, ActivationCache)):
            rec.detach()
    times = {v: [] for v in variants}
    stamps = {v: [] for v in variants}  # when each timed step ran (its midpoint)
    record = {v: [] for v in variants}
    for r in range(warmup + rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            rec = recorders[v]
            if isinstance(rec, (Probe, ActivationCache)):
                rec.attach()
            for _ in range(turn - 1):
                train_step(model, opt, tok, tgt, rec)
            t0 = time.perf_counter()
            rt = train_step(model, opt, tok, tgt, rec)
            dt = time.perf_counter() - t0
            if isinstance(rec, (Probe, ActivationCache)):
                rec.detach()
            if r >= warmup:
                times[v].append(dt)
                stamps[v].append(t0 + dt / 2)
                record[v].append(rt)
    return times, stamps, record


def launches(depth: int, variants) -> tuple[dict[str, int], str]:
    """Kernel launches of one step of each variant (after one unprofiled step): cudaLaunchKernel
    calls on a GPU, top-level ATen operator calls on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    model, opt, tok, tgt = setup(depth)
    counts, kind = {}, "top-level ATen ops (CPU)"
    for v in variants:
        rec = make_recorder(v, model)
        train_step(model, opt, tok, tgt, rec)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, opt, tok, tgt, rec)
        if isinstance(rec, (Probe, ActivationCache)):
            rec.detach()
        events = prof.events()
        if any(e.name in ("cudaLaunchKernel", "cuLaunchKernel") for e in events):
            counts[v], kind = (
                sum(e.name in ("cudaLaunchKernel", "cuLaunchKernel") for e in events),
                "cudaLaunchKernel",
            )
        else:
            counts[v] = sum(
                e.name.startswith("aten::")
                and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
                for e in events
            )
    return counts, kind


def bracketed(times: dict, stamps: dict, v: str) -> list[float]:
    """Each timed step of `v` over the plain step time interpolated at the moment it ran, between
    the plain steps just before and just after it: a drift that is linear over those few
    seconds cancels (the round's own plain step may be two turns away)."""
    import numpy as np

    ps, pt = np.asarray(stamps["plain"]), np.asarray(times["plain"])
    return [
        t / float(np.interp(s, ps, pt)) for t, s in zip(times[v], stamps[v]) if ps[0] < s < ps[-1]
    ]


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def memory_child(variant: str, depth: int, steps: int) -> None:
    """Run one variant alone; print {peak, before} in bytes as JSON."""
    model, opt, tok, tgt = setup(depth)
    rec = make_recorder(variant, model)
    before = rss_bytes()
    for _ in range(steps):
        train_step(model, opt, tok, tgt, rec)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"peak": peak, "before": before}))


def measure_memory(
    depth: int, steps: int, threads: int, size: str, variants=VARIANTS
) -> dict[str, dict]:
    out = {}
    for v in variants:
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            v,
            "--depth",
            str(depth),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
            "--size",
            size,
            "--placement",
            CONFIG["placement"],
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    global CONFIG, BATCH, SEQ
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="default")
    ap.add_argument("--depth", type=int, default=None, help="blocks (default: the size's)")
    ap.add_argument(
        "--rounds", type=int, default=20, help="timed rounds (each runs every variant once)"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--turn", type=int, default=2, help="steps per variant per round; only the last is timed"
    )
    ap.add_argument("--steps", type=int, default=3, help="steps per memory subprocess")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--forwards",
        type=int,
        default=10_000,
        help="no-grad forwards for the bounded-state line (0: skip)",
    )
    ap.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset to time, plain always included (e.g. all_stats: more rounds in the same time)",
    )
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also time forward_stats, act_grad_norm, subsample and attn_logits alone (what all_stats is made of)",
    )
    ap.add_argument(
        "--placement", default=None, help="the model's placement (default: the size's, pre-ln)"
    )
    ap.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    CONFIG, (BATCH, SEQ) = SIZES[args.size]
    CONFIG = {**CONFIG, "placement": args.placement or CONFIG["placement"]}
    depth = args.depth or CONFIG["depth"]
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, depth, args.steps)
        return
    variants = (
        VARIANTS
        if args.size == "default"
        else ("plain", "grad_norms", "between", "attention", "all_stats")
    )
    print(
        f"{args.size}: {CONFIG['placement']} decoder depth {depth}, d_model {CONFIG['d_model']}, heads {CONFIG['heads']}, ffn {CONFIG['ffn']}, "
        f"batch {BATCH}, seq {SEQ}, {args.threads} threads, torch {torch.__version__}; "
        f"{args.rounds} rounds after {args.warmup} warm-up, turns of {args.turn} steps (the last timed)"
    )
    timed = variants + tuple(BREAKDOWN) if args.breakdown else variants
    if args.variants:
        asked = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in asked if v not in VARIANTS + tuple(BREAKDOWN)]
        if unknown:
            ap.error(
                f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS + tuple(BREAKDOWN))}"
            )
        timed = ("plain",) + tuple(v for v in dict.fromkeys(asked) if v != "plain")
        variants = tuple(v for v in timed if v in VARIANTS)
    times, stamps, record = time_variants(depth, args.rounds, args.warmup, timed, args.turn)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(
        f"{'variant':<13} {'median s':>9} {'IQR s':>17} {'ratio':>7} {'paired':>7} {'paired IQR':>13} "
        f"{'bracket':>8} {'bracket IQR':>13} {'step() ms':>10}"
    )
    paired, paired_iqr, brack = {}, {}, {}
    for v in timed:
        lo, m, hi = quartiles(times[v])
        ratios = [t / p for t, p in zip(times[v], times["plain"])]  # same round: drift cancels
        rlo, paired[v], rhi = quartiles(ratios)
        paired_iqr[v] = (rlo, rhi)
        b = bracketed(times, stamps, v) if v != "plain" else [1.0, 1.0]
        brack[v] = quartiles(b)
        print(
            f"{v:<13} {m:>9.4f} {lo:>8.4f}-{hi:<8.4f} {m / med['plain']:>7.3f} {paired[v]:>7.3f} {rlo:>6.3f}-{rhi:<6.3f} "
            f"{brack[v][1]:>8.3f} {brack[v][0]:>6.3f}-{brack[v][2]:<6.3f} {1e3 * statistics.median(record[v]):>10.1f}"
        )

    counted, kind = launches(depth, [v for v in timed if v not in ("per_param", "act_cache")])
    print(
        f"kernel launches per step ({kind}), "
        f"extra over plain per block ({depth} blocks): "
        + ", ".join(f"{v} {n} (+{(n - counted['plain']) / depth:.1f})" for v, n in counted.items())
    )
    mem = measure_memory(depth, args.steps, args.threads, args.size, variants)
    base = mem["plain"]
    print(f"{'variant':<12} {'peak MiB':>9} {'step MiB':>9} {'peak ratio':>11} {'step ratio':>11}")
    for v in variants:
        m = mem[v]
        step, base_step = m["peak"] - m["before"], base["peak"] - base["before"]
        print(
            f"{v:<12} {m['peak'] / 2**20:>9.1f} {step / 2**20:>9.1f} {m['peak'] / base['peak']:>11.3f} "
            f"{step / base_step:>11.3f}"
        )
    if args.forwards:
        before, after = bounded_state(args.forwards)
        print(
            f"{args.forwards} no-grad forwards between two steps (include_eval=True): probe state {before} bytes "
            f"after the first, {after} after the last"
        )
    for v in ("grad_norms", "all_stats"):
        if v in paired:
            print(f"{v}_ratio: {paired[v]:.4f}")
            print(f"{v}_ratio_iqr: {paired_iqr[v][0]:.4f}-{paired_iqr[v][1]:.4f}")
            print(f"{v}_ratio_of_medians: {med[v] / med['plain']:.4f}")
            print(
                f"{v}_ratio_bracketed: {brack[v][1]:.4f} (IQR {brack[v][0]:.4f}-{brack[v][2]:.4f})"
            )
    k = FORWARD_EVERY
    for v, name in (("between", "amortized_ratio"), ("attention", "amortized_ratio_train")):
        if v in paired and "all_stats" in paired:
            print(
                f"{name}: {((k - 1) * paired[v] + paired['all_stats']) / k:.4f} "
                f"({'train' if v == 'attention' else 'the callbacks'}: {v} on {k - 1} of {k} recorded steps, "
                "all_stats on the other)"
            )
    for v in ("attention", "attn_logits"):
        if v in paired:
            print(f"{v}_ratio: {paired[v]:.4f} (per recorded step)")
    for v in ("grad_norms", "between", "attention", "attn_logits", "all_stats"):
        if v in counted:
            print(f"{v}_launches_per_block: {(counted[v] - counted['plain']) / depth:.1f}")
    if "all_stats" in mem:
        print(f"memory_ratio: {mem['all_stats']['peak'] / base['peak']:.4f}")
    if args.forwards:
        print(f"state_bytes_before: {before}")
        print(f"state_bytes_after: {after}")


if __name__ == "__main__":
    main()
