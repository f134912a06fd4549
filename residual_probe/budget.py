"""Memory budgets: what a run would need, estimated from its configuration before anything is built.

Unchecked, a run too big for the machine grows until the kernel kills it (exit 137, no message)
or ends in "can't allocate 4000000000000 bytes". `check` compares an `Estimate` with the memory the
machine has free and raises a `BudgetError` (one line: what it would need, what there is) so the
command refuses before allocating; `--force` skips the refusal.

The estimate counts, in float32 bytes:
- weights, gradients and Adam's two moments (plus one parameter-sized temporary of the foreach
  update), from the parameter count of a one-block model built on torch's "meta" device (no
  memory) and extrapolated per block, so every placement's own parameters are counted exactly;
- the activations a training step saves for backward, per token and block (`_block_floats`:
  attention ~7d, FFN ~3d + f, more for dual streams, second norms and dropout; the attention
  matrix B·H·T² only where dropout forces PyTorch's math path), the logits three times, and one
  block's worth of transient gradients;
- what the run keeps besides: probe rows in Python (ROW_BYTES each), token subsamples for the
  layer x layer matrices, the positions table (and its float64 construction), Monte-Carlo arrays.
tests/test_edges_budget.py holds the estimate against measured peak memory (RSS) on small configs:
within 0.88x to 1.19x on six configs (decoder, encoder, seq2seq; Pre-LN, Post-LN, ResiDual,
Sandwich with dropout; 100-500 MiB).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .errors import UserError

FLOAT = 4  # bytes: the reference models run in float32
ROW_BYTES = 700  # one recorded value as a Python dict in the probe, plus the job's copy of it
SUBSAMPLE_TOKENS = 256  # Probe's default token subsample for pairwise matrices
MEMORY_ENV = "RESIDUAL_PROBE_MEMORY"  # e.g. "8GiB": the memory to plan for (a cluster job's share)


class BudgetError(UserError):
    """A run that would not fit in memory; the message is one line meant for the user."""


@dataclass
class Estimate:
    """Peak memory of a run (bytes), its parts, and the parameter count it rests on."""

    what: str
    parameters: int
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        top = max(self.parts, key=self.parts.get) if self.parts else "nothing"
        return (
            f"about {human(self.peak_bytes)} ({self.parameters:,} parameters; "
            f"largest part: {top} {human(self.parts.get(top, 0))})"
        )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def parse_size(text: str) -> int:
    """'8GiB', '512 MB', '1e9' -> bytes."""
    units = {
        "": 1,
        "b": 1,
        "k": 1e3,
        "kb": 1e3,
        "kib": 2**10,
        "m": 1e6,
        "mb": 1e6,
        "mib": 2**20,
        "g": 1e9,
        "gb": 1e9,
        "gib": 2**30,
        "t": 1e12,
        "tb": 1e12,
        "tib": 2**40,
    }
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("kmgtib")
    try:
        value = float(num) * units[s[len(num) :]]
    except (ValueError, KeyError):
        raise BudgetError(
            f"{MEMORY_ENV}: expected a size such as 8GiB or 512MB, got {text!r}"
        ) from None
    if not value > 0:
        raise BudgetError(f"{MEMORY_ENV}: must be positive, got {text!r}")
    return int(value)


# ---- what the machine has ------------------------------------------------------------------


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_free() -> int | None:
    """Room left under a cgroup v2 (or v1) memory limit, where one is set."""
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(limit_path) as fh:
                limit = fh.read().strip()
            with open(usage_path) as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            return max(0, int(limit) - usage)
    return None


def available_memory() -> tuple[int, str]:
    """(bytes, where the number comes from): RESIDUAL_PROBE_MEMORY if set, else the smaller of
    MemAvailable (/proc/meminfo) and the cgroup's free room, else the physical memory."""
    if os.environ.get(MEMORY_ENV):
        return parse_size(os.environ[MEMORY_ENV]), f"{MEMORY_ENV}"
    found = []
    avail = _meminfo("MemAvailable")
    if avail is not None:
        found.append((avail, "available (MemAvailable)"))
    cg = _cgroup_free()
    if cg is not None:
        found.append((cg, "free under this job's cgroup limit"))
    if found:
        return min(found)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    except (ValueError, OSError, AttributeError):
        return 0, "unknown"


def check(est: Estimate, force: bool = False) -> tuple[int, str]:
    """Raise BudgetError if `est` does not fit in the memory available (unless `force`);
    returns (available bytes, source) for the caller to report."""
    have, source = available_memory()
    if have and est.peak_bytes > have and not force:
        raise BudgetError(
            f"{est.what} needs {est.describe()} of memory, but this machine has {human(have)} {source}; "
            "use smaller sizes, or --force to run anyway"
        )
    return have, source


def require(est: Estimate, force: bool = False, echo=None) -> None:
    """`check`, then say what was decided through `echo(line, err=...)` (typer.echo; None: silent):
    a warning when `force` runs past what the machine has, and the estimate (both on stderr)."""
    have, source = check(est, force)
    if echo is None:
        return
    if force and have and est.peak_bytes > have:
        echo(
            f"warning: --force: {est.what} needs {est.describe()}, more than the {human(have)} {source}",
            err=True,
        )
    echo(f"memory: {est.describe()}; {human(have)} {source}", err=True)


# ---- the models ----------------------------------------------------------------------------


def model_parameters(cfg) -> tuple[int, dict[str, int]]:
    """(parameter count, per-block counts) of `Transformer(cfg)`, without allocating it.

    Blocks 0 and 1 of each stack are built on the meta device (no memory, and placement-owned parameters
    such as ReZero's gate are counted as the model has them); embeddings, the placement's
    embedding and final norms and an untied output projection are added by their sizes.
    Meta tensors only: a meta `arange` or random init would load torch's meta registrations (~5 s).
    """
    import torch

    from .models.layers import make_norm
    from .models.placements import make_placement
    from .models.transformer import Block

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    d, vocab = cfg.d_model, cfg.vocab_size
    total = 0 if cfg.tie_embeddings else vocab * d
    per_block = {}
    with torch.device("meta"):
        for role, depth in ((r, cfg.stack_depth(r)) for r in ("encoder", "decoder")):
            if not depth:
                continue
            placement = make_placement(cfg, role)
            norm = count(make_norm(placement.norm or cfg.norm, d))
            first, later = (
                count(
                    Block(
                        cfg,
                        placement,
                        k,
                        causal=role == "decoder",
                        cross=role == "decoder" and cfg.arch == "seq2seq",
                    )
                )
                for k in (0, min(1, depth - 1))
            )  # block 0 may differ from the rest (HybridNorm*'s Pre-Norm first block)
            per_block[role] = first
            shared = role == "decoder" and getattr(
                cfg, "share_all_embeddings", False
            )  # the encoder's table
            total += first + (depth - 1) * later + (0 if shared else vocab * d)
            total += norm * (bool(placement.embed_norm) + bool(placement.final_norm))
    return int(total), per_block


def _block_floats(cfg, role: str, batch: int, seq_len: int, training: bool) -> float:
    """Floats one block saves for backward (training) or holds at once (forward only), per batch.

    Per token: attention ~7d (norm output, q, k, v, attention output and its reshaped copy, the
    sum), FFN ~3d + f (norm output, ReLU output shared with fc2's input, fc2 output, the sum),
    a dual stream d per sublayer, Sandwich's second norm 2d; dropout keeps a mask (1 byte) and
    its output (1.25 floats per element). The attention matrix B·H·T² is saved only on the math
    path, which dropout forces; without dropout PyTorch's CPU/flash kernels keep B·H·T.
    """
    d, f, h, T = cfg.d_model, cfg.ffn, cfg.heads, seq_len
    rates = (
        cfg.dropout,
        getattr(cfg, "attention_dropout_rate", cfg.dropout),
        getattr(cfg, "activation_dropout_rate", cfg.dropout),
    )
    drop = 1.25 if training and max(rates) > 0 else 0.0
    extra = (d if cfg.placement == "residual" else 0) + (
        2 * d if cfg.placement in ("sandwich", "peri-ln") else 0
    )
    attn = 7 * d + extra + drop * d
    ffn = 3 * d + f + extra + drop * (d + f)
    n_attn = 2 if cfg.arch == "seq2seq" and role == "decoder" else 1
    probs = n_attn * h * batch * T * (T * (1 + 2 * drop) if drop else 1)
    return (n_attn * attn + ffn) * batch * T + probs


def step_parts(
    cfg, batch: int, seq_len: int, optimizer: bool, training: bool = True
) -> tuple[int, dict[str, float]]:
    """(parameters, parts in bytes) of one forward/backward (and Adam update) of `Transformer(cfg)`."""
    P, _ = model_parameters(cfg)
    tokens = batch * seq_len
    stacks = [(r, cfg.stack_depth(r)) for r in ("encoder", "decoder")]
    blocks = {role: _block_floats(cfg, role, batch, seq_len, training) for role, n in stacks if n}
    acts = sum(blocks[role] * n for role, n in stacks if n) + 2 * cfg.d_model * tokens * len(blocks)
    parts = {
        "weights": FLOAT * P,
        "positions table": FLOAT * cfg.max_len * cfg.d_model * len(blocks),
    }
    if training:
        parts["gradients"] = FLOAT * P
        parts["activations"] = FLOAT * (
            acts + max(blocks.values())
        )  # + one block's transient gradients
        parts["logits"] = FLOAT * 3 * tokens * cfg.vocab_size
        if optimizer:
            parts["Adam state"] = (
                FLOAT * 2.5 * P
            )  # two moments and the foreach update's temporaries
    else:
        parts["activations"] = FLOAT * 3 * max(blocks.values())
    # Building the positions table goes through float64 sin/cos halves: a transient of ~20 bytes
    # per entry, before the activations exist.
    build = 20 * cfg.max_len * cfg.d_model + FLOAT * P
    if build > sum(parts.values()):
        parts["building the positions table"] = build - sum(parts.values())
    return P, parts


def _blocks(cfg) -> int:
    return cfg.stack_depth("encoder") + cfg.stack_depth("decoder")


def _sublayers(cfg) -> int:
    n_enc, n_dec = cfg.stack_depth("encoder"), cfg.stack_depth("decoder")
    return 2 * n_enc + (3 if cfg.arch == "seq2seq" else 2) * n_dec


def _describe_cfg(cfg) -> str:
    return f"{cfg.arch} {cfg.placement}, {_blocks(cfg)} blocks, d {cfg.d_model}, ffn {cfg.ffn}"


# ---- the jobs ------------------------------------------------------------------------------


def train_estimate(spec) -> Estimate:
    """`train`: one model, Adam, the probe's rows every `probe_every` steps (kept in memory)."""
    cfg = spec.model_config()
    P, parts = step_parts(cfg, spec.batch, spec.seq_len, optimizer=spec.steps > 0)
    recorded = math.ceil(max(spec.steps, 1) / spec.probe_every)
    parts["probe records"] = ROW_BYTES * recorded * (12 * _blocks(cfg) + 2 * _sublayers(cfg))
    return Estimate(
        f"train ({_describe_cfg(cfg)}, batch {spec.batch} x {spec.seq_len} tokens)", P, parts
    )


def grad_norms_estimate(spec) -> Estimate:
    """`grad-norms`: the largest placement's model at a time; rows of every run kept until the end."""
    best = None
    for placement in spec.placements:
        cfg = spec.model_config(placement)
        P, parts = step_parts(cfg, spec.batch, spec.seq_len, optimizer=spec.steps > 0)
        if best is None or sum(parts.values()) > sum(best[2].values()):
            best = (cfg, P, parts)
    cfg, P, parts = best
    rows = len(spec.placements) * spec.seeds * (spec.steps + 1) * (_blocks(cfg) + _sublayers(cfg))
    parts = dict(parts, **{"recorded rows": 2 * ROW_BYTES * rows})
    return Estimate(
        f"grad-norms ({_describe_cfg(cfg)}, batch {spec.batch} x {spec.seq_len} tokens)", P, parts
    )


def bounds_estimate(spec) -> Estimate:
    """`bounds`: the largest model run (seq2seq at the top depth), its token subsamples, every
    run's rows, and the collapse Monte-Carlo (top + 1, tokens, d) float64 array."""
    top = max(spec.depths)
    settings = spec.settings or ("xiong",)
    ladder = spec.depth_ladder()
    best = None
    for arch, placement in (
        (spec.arch, "residual"),
        ("seq2seq", "residual"),
        ("seq2seq", "post-ln"),
    ):
        cfg = spec.config(settings[0], arch, placement, top)
        P, parts = step_parts(cfg, spec.batch, spec.seq_len, optimizer=False)
        streams = 2 if placement == "residual" else 1
        parts["token subsamples"] = (
            FLOAT * 2 * (_blocks(cfg) + 2) * streams * SUBSAMPLE_TOKENS * cfg.d_model
        )
        if best is None or sum(parts.values()) > sum(best[2].values()):
            best = (cfg, P, parts)
    cfg, P, parts = best
    n_stack = 2 if spec.arch == "seq2seq" else 1
    block_runs = len(settings) * (2 * sum(ladder) * n_stack + top * n_stack + 3 * 2 * top)
    parts["recorded rows"] = ROW_BYTES * spec.seeds * block_runs * 16
    parts["collapse Monte-Carlo"] = 8 * 3 * (top + 1) * spec.collapse_tokens * spec.collapse_d
    return Estimate(
        f"bounds (depth {top}: {_describe_cfg(cfg)}, batch {spec.batch} x {spec.seq_len} tokens)",
        P,
        parts,
    )


def collapse_estimate(
    label: str,
    parameters: int,
    blocks: int,
    width: int,
    streams: int,
    batch: int,
    seq_len: int,
    subsample: int,
) -> Estimate:
    """`collapse` of one loaded model (its weights already in memory, so not counted): a no-grad
    forward of one batch (a few (B, T, width) tensors and one B·T² attention matrix per head group),
    the token subsamples, and the layer x layer matrices (cosine and CKA, and their temporaries)."""
    tokens = batch * seq_len
    n = blocks + 1
    parts = {
        "forward activations": FLOAT * (16 * tokens * width + 4 * batch * seq_len * seq_len),
        "token subsamples": FLOAT * 2 * n * streams * subsample * width,
        "layer x layer matrices": FLOAT * 4 * n * n * streams,
    }
    return Estimate(
        f"collapse of {label} ({blocks} blocks, width {width}, batch {batch} x {seq_len} tokens)",
        parameters,
        parts,
    )


def ckpt_gradient_estimate(
    label: str, parameters: int, blocks: int, width: int, batch: int, seq_len: int, vocab: int
) -> Estimate:
    """`grad-norms --ckpt` of one loaded model (its weights already in memory, so not counted): one
    backward of a batch of windows. Per block and token ~16·width floats saved for backward (the
    `_block_floats` count with an FFN of 4·width) and the attention probabilities B·H·T² with the
    usual head size of 64; the logits three times (output, log-softmax, its gradient); a gradient
    per parameter. A planning figure, not held against measured peaks as the reference models' are."""
    tokens = batch * seq_len
    heads = max(1, width // 64)
    parts = {
        "gradients": FLOAT * parameters,
        "activations": FLOAT * blocks * (16 * tokens * width + batch * heads * seq_len * seq_len),
        "logits": FLOAT * 3 * tokens * vocab,
    }
    return Estimate(
        f"the gradient of {label} ({blocks} blocks, width {width}, batch {batch} x {seq_len} tokens)",
        parameters,
        parts,
    )
