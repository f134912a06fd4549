"""What sets Theorem 1's measured Pre-LN exponent: the last block's W2 gradient against depth, by setting.

Xiong et al. (2020), Theorem 1: for Pre-LN the last FFN output weight's gradient is
O(d sqrt(ln d / L)), a log-log slope of -1/2 in the depth L. `bounds` measures it on an encoder
with a masked-token loss and finds it steeper. This script varies one thing at a time, at
initialization (Pre-LN, d 128, FFN 512, 4 heads, batch 8 x 32 random tokens of 256, depths
6-48, 3 seeds), and prints the fitted slope of each setting with its standard error:

- encoder, masked-token loss (bounds' setting: 15 % of positions replaced by one mask token,
  loss on those only);
- encoder, masked positions NOT replaced (loss on 15 % random positions, inputs intact);
- encoder, loss on every position (random targets);
- decoder (causal), next-token loss on every position (a decoder-only LM's own setting);
- decoder, masked-token loss as the encoder's.

Usage: python analyses/theorem1_setting.py [--inits xiong,fairseq]
"""

from __future__ import annotations

import argparse

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


def w2_grad(setting: str, init: str, depth: int, seed: int) -> float:
    arch = "decoder" if setting.startswith("decoder") else "encoder"
    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(
            arch=arch,
            placement="pre-ln",
            depth=depth,
            d_model=128,
            heads=4,
            ffn=512,
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


def slope(depths, values) -> tuple[float, float]:
    """Least-squares slope of log(value) on log(depth) over all seeds, and its standard error."""
    from scipy import stats

    x = np.log(np.repeat(depths, values.shape[1]))
    fit = stats.linregress(x, np.log(values.ravel()))
    return fit.slope, fit.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--inits", default="xiong,fairseq")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("init     setting                                      slope     se    (theorem: -0.5)")
    for init in args.inits.split(","):
        for setting in SETTINGS:
            v = np.array([[w2_grad(setting, init, n, s) for s in SEEDS] for n in DEPTHS])
            b, se = slope(np.array(DEPTHS), v)
            print(f"{init:8s} {setting:44s} {b:+.3f}  {se:.3f}")


if __name__ == "__main__":
    main()
