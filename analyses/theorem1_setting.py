"""What sets Theorem 1's measured Pre-LN exponent: the last block's W2 gradient against depth, by setting.

Xiong et al. (2020), Theorem 1: for Pre-LN the last FFN output weight's gradient is
O(d sqrt(ln d / L)), an upper bound with log-log slope -1/2 in the depth L; a measured slope at or
below -1/2 is consistent with it (analysis.checks.theorem1). `bounds` measures it on an encoder
with a masked-token loss and finds it steeper. This script varies one thing at a time, at
initialization (Pre-LN, FFN 4d, 4 heads, batch 8 x 32 random tokens of 256, depths 6-48, 3 seeds),
and prints the fitted slope of each setting with its standard error and 95 % interval:

- encoder, masked-token loss (bounds' setting: 15 % of positions replaced by one mask token,
  loss on those only);
- encoder, masked positions NOT replaced (loss on 15 % random positions, inputs intact);
- encoder, loss on every position (random targets);
- decoder (causal), next-token loss on every position (a decoder-only LM's own setting);
- decoder, masked-token loss as the encoder's.

With --out it writes theorem1_setting.csv (one row per init, width, setting) and
theorem1_setting.png (the slopes with their intervals against the width, beside -1/2).

Usage: python analyses/theorem1_setting.py [--inits xiong,fairseq] [--widths 64,128,256]
       [--settings masked,every] [--out figures]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from residual_probe.models import ModelConfig, Transformer

DEPTHS, SEEDS, BATCH, SEQ, VOCAB, MASK_ID, RATE = (6, 12, 24, 48), (0, 1, 2), 8, 32, 256, 0, 0.15


def batch(setting: str, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    seq = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    masked = torch.rand(seq.shape, generator=g) < RATE
    masked[:, 0] |= ~masked.any(dim=1)
    if setting.endswith("masked-token"):
        return seq.masked_fill(masked, MASK_ID), seq.masked_fill(~masked, -100)
    if setting.endswith("unreplaced"):
        return seq, torch.randint(1, VOCAB, seq.shape, generator=g).masked_fill(~masked, -100)
    if setting.endswith("every position"):
        return seq, torch.randint(1, VOCAB, seq.shape, generator=g)
    return seq, torch.cat([seq[:, 1:], torch.full_like(seq[:, :1], -100)], dim=1)  # next token


def w2_grad(setting: str, init: str, depth: int, seed: int, d: int = 128) -> float:
    arch = "decoder" if setting.startswith("decoder") else "encoder"
    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(
            arch=arch,
            placement="pre-ln",
            depth=depth,
            d_model=d,
            heads=4,
            ffn=4 * d,
            init=init,
            dropout=0.0,
            max_len=64,
        )
    )
    x, y = batch(setting, seed)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    stack = model.decoder if arch == "decoder" else model.encoder
    return float(stack.layers[-1].ffn.fc2.weight.grad.double().norm())


SETTINGS = (
    "encoder, masked-token",
    "encoder, masked unreplaced",
    "encoder, random targets at every position",
    "decoder, next token at every position",
    "decoder, masked-token",
)
SHORT = {"masked": SETTINGS[0], "unreplaced": SETTINGS[1], "every": SETTINGS[2]}
SHORT |= {"decoder-next": SETTINGS[3], "decoder-masked": SETTINGS[4]}


def measure(inits, widths, settings) -> list[dict]:
    """One row per (init, width, setting): the slope over DEPTHS x SEEDS, its standard error and 95 %
    interval (analysis.fits), and Theorem 1's check (analysis.checks.theorem1) on it."""
    from residual_probe.analysis.checks import theorem1
    from residual_probe.analysis.fits import loglog_slope

    rows = []
    for init in inits:
        for d in widths:
            for setting in settings:
                t0 = time.perf_counter()
                w2 = np.array([[w2_grad(setting, init, n, s, d) for n in DEPTHS] for s in SEEDS])
                fit = loglog_slope(DEPTHS, w2)
                low, high = fit.interval(0.95)
                check, _ = theorem1(f"{init}/{setting}", "pre-ln", list(DEPTHS), w2)
                rows.append(
                    dict(
                        init=init,
                        d_model=d,
                        setting=setting,
                        slope=round(fit.slope, 4),
                        stderr=round(fit.stderr, 4),
                        low95=round(low, 4),
                        high95=round(high, 4),
                        agreement=check.agreement,
                        seconds=round(time.perf_counter() - t0, 1),
                    )
                )
                r = rows[-1]
                print(
                    f"{init:8s} d {d:4d} {setting:44s} {r['slope']:+.3f}  {r['stderr']:.3f}  "
                    f"[{low:+.3f}, {high:+.3f}]  {check.agreement}",
                    flush=True,
                )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Slope with its 95 % interval against the width, one panel per init, one series per setting,
    beside Theorem 1's -1/2 (the bound: at or below it is consistent)."""
    from residual_probe.plots import style

    style.setup()
    import matplotlib.pyplot as plt

    inits = list(dict.fromkeys(r["init"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(inits), figsize=(5 * len(inits), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, init in zip(axes, inits):
        for i, setting in enumerate(settings):
            sel = [r for r in rows if r["init"] == init and r["setting"] == setting]
            x = np.array([r["d_model"] for r in sel]) * (1 + 0.04 * (i - (len(settings) - 1) / 2))
            y = np.array([r["slope"] for r in sel])
            err = np.array(
                [[r["slope"] - r["low95"] for r in sel], [r["high95"] - r["slope"] for r in sel]]
            )
            ax.errorbar(
                x, y, yerr=err, marker="os^vD"[i % 5], capsize=3, label=setting, color=f"C{i}"
            )
        ax.axhline(-0.5, color="k", lw=1, ls="--", label="Theorem 1: -1/2 (upper bound)")
        ax.axhspan(-0.5, 0.5, color="0.9", zorder=0, label="above -1/2: would contradict it")
        ax.set_xscale("log", base=2)
        widths = sorted({r["d_model"] for r in rows})
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel("d_model (FFN 4d)")
        ax.set_title(f"Pre-LN at init, {init} init")
    lows = [r["low95"] for r in rows]
    axes[0].set_ylim(min(lows) - 0.1, -0.2)
    axes[0].set_ylabel("log-log slope of last-block W2 grad in L\n(95 % interval, depths 6-48)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    style.save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--inits", default="xiong,fairseq")
    ap.add_argument("--widths", default="128", help="d_model values, comma-separated (FFN 4d)")
    ap.add_argument(
        "--settings", default=",".join(SHORT), help=f"comma-separated, of {', '.join(SHORT)}"
    )
    ap.add_argument("--out", type=Path, help="write theorem1_setting.csv and .png here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        "init     d    setting                                      slope     se    95 % interval"
    )
    rows = measure(
        args.inits.split(","),
        [int(w) for w in args.widths.split(",")],
        [SHORT[s] for s in args.settings.split(",")],
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "theorem1_setting.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot(rows, args.out / "theorem1_setting")


if __name__ == "__main__":
    main()
