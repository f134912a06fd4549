"""Peak memory (and time) of `grad-norms --ckpt` versus a plain forward+backward of the same batches.

The model: a random-weight 135M-parameter, 30-block Llama (SmolLM2-135M's shape: width 576, 9
heads, 3 KV heads, FFN 1536, vocabulary 49152, tied embeddings), saved as a Hugging Face folder.
Each variant runs in its own process (so each peak is its own), on the same windows of the
built-in text (byte tokens, 8192 tokens at seq-len 256 by default, batches of 8):
- plain: load, then for every batch logits -> summed cross-entropy / total -> backward;
- probe: the job's path: load_any, placement detection, the data contract, the probe reading
  every block's gradient norm (jobs.ckpt_grads.model_gradients).
Peak = the process's high-water resident set (VmHWM); "model" = resident set after loading.
Prints both peaks, their ratio and the ratio of the increments over the loaded model.

    python benchmarks/ckpt_grads_memory.py [--tokens 8192] [--seq-len 256] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def status(key: str) -> int:
    """A /proc/self/status entry in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


LLAMA_SHAPES = {
    "135m": dict(  # SmolLM2-135M's shape
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
    "1b": dict(  # 1.07B parameters
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}


def make_model(folder: Path, size: str = "135m") -> int:
    """A random-weight Llama of one of LLAMA_SHAPES saved as a Hugging Face folder; its parameter count."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        **LLAMA_SHAPES[size],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def child(mode: str, folder: str, tokens: int, seq_len: int, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from residual_probe.checkpoints import load_any
    from residual_probe.checkpoints.text import read_text, text_windows
    from residual_probe.jobs.ckpt_grads import loss_batches, model_gradients

    loaded = load_any(folder)
    w = text_windows(loaded, read_text(None)[0], tokens, seq_len)
    rss_model = status("VmRSS")
    t0 = time.perf_counter()
    if mode == "plain":
        batches, total = loss_batches(loaded, "causal-lm", w.ids, batch, 0)
        model = loaded.model
        model.zero_grad(set_to_none=True)
        for (ids,), targets in batches:
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            (loss / total).backward()
            del logits, loss
    else:
        from residual_probe.probe import find_blocks
        from residual_probe.probe.structure import detect_placement

        with torch.no_grad():
            detect_placement(
                find_blocks(loaded.model), lambda: loaded.forward(w.ids[:1, :8]), loaded.model
            )
        model_gradients(loaded, "causal-lm", w.ids, batch)
    return {
        "mode": mode,
        "seconds": time.perf_counter() - t0,
        "rss_model": rss_model,
        "peak": status("VmHWM"),
        "windows": int(w.ids.shape[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(
            json.dumps(child(args.child[0], args.child[1], args.tokens, args.seq_len, args.batch))
        )
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        n = make_model(Path(tmp) / "llama135m")
        print(
            f"model: random Llama, {n / 1e6:.1f}M parameters, 30 blocks; {args.tokens} tokens at seq-len "
            f"{args.seq_len}, batches of {args.batch}, {args.threads} threads"
        )
        results = {}
        for mode in ("plain", "probe"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                str(Path(tmp) / "llama135m"),
                "--tokens",
                str(args.tokens),
                "--seq-len",
                str(args.seq_len),
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(
                    f"{mode} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}"
                )
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(
                f"{mode:>6}: {r['seconds']:.1f} s, peak {r['peak'] / 2**30:.2f} GiB, after loading "
                f"{r['rss_model'] / 2**30:.2f} GiB ({r['windows']} windows)"
            )
    plain, probe = results["plain"], results["probe"]
    print(f"peak ratio probe / plain: {probe['peak'] / plain['peak']:.3f}")
    print(
        f"increment ratio (peak - loaded): "
        f"{(probe['peak'] - probe['rss_model']) / (plain['peak'] - plain['rss_model']):.3f}"
    )
    print(f"time ratio: {probe['seconds'] / plain['seconds']:.2f}")


if __name__ == "__main__":
    main()
