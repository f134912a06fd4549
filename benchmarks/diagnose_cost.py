"""Time and peak memory of `residual-probe diagnose` against a bare forward+backward on the same tokens.

The model: a random-weight Llama of SmolLM2-135M's shape (30 blocks, width 576, 9 heads, 3 KV
heads, vocabulary 49152; `ckpt_grads_memory.make_model`), or with `--size 1b` a 1.07B-parameter
one (16 blocks, width 2048, 32 heads, 8 KV heads, FFN 8192), saved as a Hugging Face folder.
Each run is its own process (so each peak is its own), alternating, `--rounds` times:
- bare: load the folder, cut the built-in text into the windows diagnose uses (the data
  contract, `--tokens` at `--seq-len`, batches of 8), logits -> summed cross-entropy -> backward;
- diagnose: the command itself, in process (`residual-probe diagnose --ckpt FOLDER ...`): loading,
  placement detection, the gradient (with the forward statistics in the same pass for a causal LM),
  collapse's similarity matrices, figures, report.
Both times run from just before loading to the end. Prints the medians and their spread, and
the two ratios the goal is stated in (diagnose at most 1.25x the time, 1.1x the peak):

    diagnose_ratio: 1.18 (rounds 1.15-1.21)
    diagnose_memory_ratio: 1.04 (rounds 1.03-1.05)

    python benchmarks/diagnose_cost.py [--size 135m|1b] [--tokens 8192] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ckpt_grads_memory import LLAMA_SHAPES, make_model, status


def child(mode: str, folder: str, tokens: int, seq_len: int) -> dict:
    import torch.nn.functional as F

    t0 = time.perf_counter()
    if mode == "bare":
        from residual_probe.checkpoints import load_any
        from residual_probe.checkpoints.text import read_text, text_windows
        from residual_probe.jobs.ckpt_grads import loss_batches

        loaded = load_any(folder)
        w = text_windows(loaded, read_text(None)[0], tokens, seq_len)
        batches, total = loss_batches(loaded, "causal-lm", w.ids, 8, 0)
        for (ids,), targets in batches:
            logits = loaded.model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            (loss / total).backward()
            del logits, loss
    else:
        from residual_probe.cli import app

        with tempfile.TemporaryDirectory() as out:
            args = [
                "diagnose",
                "--ckpt",
                folder,
                "--tokens",
                str(tokens),
                "--seq-len",
                str(seq_len),
            ]
            app([*args, "--out", f"{out}/d"], standalone_mode=False)
    return {"mode": mode, "seconds": time.perf_counter() - t0, "peak": status("VmHWM")}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (rounds {min(values):.3f}-{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(LLAMA_SHAPES), default="135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        result = child(args.child[0], args.child[1], args.tokens, args.seq_len)
        print(json.dumps(result))
        return
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=f"{root}:{root / 'benchmarks'}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"llama{args.size}"
        n = make_model(folder, args.size)
        print(
            f"model: random Llama, {n / 1e6:.0f}M parameters; {args.tokens} tokens at seq-len "
            f"{args.seq_len}, batches of 8, {args.threads} threads, {args.rounds} rounds",
            file=sys.stderr,
        )
        runs: dict[str, list[dict]] = {"bare": [], "diagnose": []}
        for _ in range(args.rounds):
            for mode in runs:
                cmd = [sys.executable, __file__, "--child", mode, str(folder)]
                cmd += ["--tokens", str(args.tokens), "--seq-len", str(args.seq_len)]
                cmd += ["--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    raise SystemExit(f"{mode} failed:\n{proc.stderr.strip()[-2000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[mode].append(r)
                print(
                    f"{mode:>8}: {r['seconds']:.1f} s, peak {r['peak'] / 2**30:.2f} GiB",
                    file=sys.stderr,
                )
    bare, diag = runs["bare"], runs["diagnose"]
    for key in ("seconds", "peak"):
        unit = (lambda v: f"{v:.1f} s") if key == "seconds" else (lambda v: f"{v / 2**30:.2f} GiB")
        print(
            f"{key}: bare {unit(statistics.median(r[key] for r in bare))}, "
            f"diagnose {unit(statistics.median(r[key] for r in diag))} (medians)"
        )
    print(f"diagnose_ratio: {spread([d['seconds'] / b['seconds'] for b, d in zip(bare, diag)])}")
    peaks = [d["peak"] / b["peak"] for b, d in zip(bare, diag)]
    print(f"diagnose_memory_ratio: {spread(peaks)}")


if __name__ == "__main__":
    main()
