"""The ResiDual paper's translation experiment at CPU scale: encoder-decoder, depth x placement x warm-up.

The paper's headline table (IWSLT'14 De-En, BLEU) trains E6D6 and E12D12 Transformers with
Post-LN, Pre-LN and ResiDual, with and without warm-up. This study runs the same grid on a task
2 CPU cores can train in minutes, with the paper's optimizer settings at a CPU-sized width, and
records the probe during training so the figures show *why* a run fails or trails.

Task: sentences of CPython's documentation (`pydoc_data.topics`, shipped with every CPython),
lowercased and cut into clauses of at most 32 bytes, are translated into Pig Latin: a word moves
its onset (the consonants before the first vowel) to the end and adds "ay" ("the" -> "ethay"),
a vowel-initial word adds "way". Tokens are words and punctuation marks in one joint dictionary
(as fairseq's joined dictionary with shared embeddings), so this is word-by-word translation
into a language with its own vocabulary: deterministic and linguistically shaped (the onset/rime
split of English syllables), not a copy (every word becomes another token; punctuation stays), and the
decoder needs the source at every step (nothing in the target prefix tells which word comes
next). Held-out sentences (10 %, chosen by a hash of the sentence) are never seen in training;
held-out clauses with a word unseen in training are dropped (its Pig Latin is not in the
dictionary). Why words and not bytes: a byte-level version (the same rule on UTF-8 bytes) did
not learn to read the source within the budget (after 400 steps its E6D6 Post-LN decoded
"ethay ethay ..." for every input, BLEU 0.2); words make sequences ~5x shorter. At 400 steps
the word-level models were still early in training (BLEU of greedy decodes below 2); at 1200
steps Pre-LN reaches BLEU 28 at E6D6. Held-out loss and token accuracy are reported beside BLEU.

Training follows the paper's released IWSLT config (microsoft/ResiDual hydra_config/iwslt.yaml):
Adam betas (0.9, 0.98), weight decay 1e-4, inverse-sqrt schedule, label smoothing 0.1, dropout
0.3 / attention dropout 0.1 / activation dropout 0.1, shared embeddings, no clipping; width
d 64, 4 heads, FFN 256 (the paper: 256 / 4 / 1024). Warm-up is a fixed fraction of the run
(fairseq's 4000 updates cannot be scaled to a few hundred steps in absolute terms); "no warm-up"
removes the linear ramp and keeps the same inverse-sqrt decay, so the two arms differ only in
the ramp.

The LM part explains the decoder-only training study's gap (ResiDual trails Pre-LN): it reruns
that study's 24-block LM and the paper's depth (6 blocks) and measures, for ResiDual, each
stream's gradient and its contribution to the output over training.

Runs are resumable: each run writes OUT/runs/translation/<run>/result.json when it finishes and
is skipped when that file exists; results and figures are written from all finished runs.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import random
import re
import time
import zlib
from collections import defaultdict
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

import numpy as np

from ..analysis.checks import Check

BOS, EOS, PAD = 0, 1, 2  # the first ids of the task's dictionary (SPECIALS)
VOWELS = frozenset("aeiou")
PLACEMENTS = ("post-ln", "pre-ln", "residual")

# The paper's Table (IWSLT'14 De-En BLEU), as quoted in issue 13; None: not reported, "fail": did not train.
PAPER_BLEU = {
    (6, "post-ln", True): 35.37, (6, "pre-ln", True): 35.12, (6, "residual", True): 35.63,
    (12, "post-ln", True): "fail", (12, "pre-ln", True): 35.18, (12, "residual", True): 36.09,
    (6, "post-ln", False): None, (6, "pre-ln", False): 32.28, (6, "residual", False): 35.76,
    (12, "post-ln", False): None, (12, "pre-ln", False): 31.82, (12, "residual", False): 35.57,
}


# ---- the task ---------------------------------------------------------------------------------

def pig_latin_word(w: str) -> str:
    """One lowercase word: onset (consonants before the first vowel; "qu" and a non-initial "y"
    as in English spelling) moved to the end plus "ay"; vowel-initial words add "way"."""
    if w[0] in VOWELS:
        return w + "way"
    i = 0
    while i < len(w) and not (w[i] in VOWELS or (i > 0 and w[i] == "y")):
        i += 2 if w[i] == "q" and w[i + 1 : i + 2] == "u" else 1
    return w[i:] + w[:i] + "ay"


def pig_latin(text: str) -> str:
    """Every run of letters a-z rewritten by `pig_latin_word`; everything else unchanged."""
    return re.sub(r"[a-z]+", lambda m: pig_latin_word(m.group()), text)


def prose_sentences() -> list[str]:
    """Lowercased English sentences of the pydoc topics, unique and sorted.

    Paragraphs with indented lines (code, grammar, tables) are skipped; a sentence is kept if it is
    printable ASCII, starts with a capital, ends with . ! or ?, and is at least 85 % letters and spaces.
    """
    from pydoc_data.topics import topics

    found = set()
    for para in re.split(r"\n\s*\n", "\n\n".join(topics[k] for k in sorted(topics))):
        lines = para.splitlines()
        if any(line.startswith("   ") for line in lines):
            continue
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(line.strip() for line in lines)):
            s = s.strip()
            if (s and s.isascii() and s.isprintable() and s[0].isupper() and s[-1] in ".!?"
                    and sum(c.isalpha() or c == " " for c in s) >= 0.85 * len(s)):
                found.add(s.lower())
    return sorted(found)


def sentence_units(sentence: str, max_bytes: int, min_bytes: int) -> list[str]:
    """A sentence cut at clause punctuation (, ; :), then into word-aligned chunks of <= max_bytes."""
    units = []
    for clause in re.split(r"(?<=[,;:])\s+", sentence):
        cur = ""
        for w in clause.split():
            if cur and len(cur) + 1 + len(w) > max_bytes:
                units.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}" if cur else w
        if cur:
            units.append(cur)
    return [u for u in units if min_bytes <= len(u) <= max_bytes]


TOKEN = re.compile(r"[a-z]+|[^a-z\s]")  # a word, or one punctuation mark


def tokens(unit: str) -> list[str]:
    return TOKEN.findall(unit)


def target_tokens(unit: str) -> list[str]:
    """The Pig Latin of a unit, token by token (what the decoder writes)."""
    return [pig_latin_word(t) if t.isalpha() else t for t in tokens(unit)]


SPECIALS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2: BOS, EOS, PAD


@dataclass
class TaskData:
    train: dict[int, list[str]]  # source length in tokens -> training units of that length
    heldout: list[str]  # held-out units: from held-out sentences, not in training, every word known
    sentences: tuple[int, int]  # (training, held-out) sentence counts
    vocab: list[str]  # one joint dictionary (fairseq's joined dictionary, shared embeddings)

    def __post_init__(self):
        self.index = {t: i for i, t in enumerate(self.vocab)}

    def ids(self, toks: list[str]) -> list[int]:
        return [self.index[t] for t in toks]


@functools.lru_cache(maxsize=4)
def task_data(max_bytes: int = 32, min_bytes: int = 12, holdout_per_mille: int = 100) -> TaskData:
    """Units of the prose sentences, split by sentence (a stable hash puts ~10 % of sentences in held-out).

    The dictionary holds the training units' source and target tokens; a held-out unit with a word
    never seen in training is dropped (its Pig Latin would be a token the model has no entry for:
    the task tests the transformation of known words in unseen sentences).
    """
    train, held, n = set(), set(), [0, 0]
    for s in prose_sentences():
        side = zlib.crc32(s.encode()) % 1000 < holdout_per_mille
        n[side] += 1
        (held if side else train).update(sentence_units(s, max_bytes, min_bytes))
    held -= train  # a unit that also occurs in a training sentence is not held out
    known = {t for u in train for t in tokens(u)}
    vocab = list(SPECIALS) + sorted(known | {t for u in train for t in target_tokens(u)})
    by_len: dict[int, list[str]] = defaultdict(list)
    for u in sorted(train):
        by_len[len(tokens(u))].append(u)
    heldout = sorted(u for u in held if set(tokens(u)) <= known)
    return TaskData(dict(by_len), heldout, (n[0], n[1]), vocab)


def encode_pairs(units: list[str], data: TaskData):
    """(src (B, S), tgt_in (B, T), targets (B, T)) for units of one source length; T = longest target + EOS."""
    import torch

    src = torch.tensor([data.ids(tokens(u)) for u in units])
    tgts = [data.ids(target_tokens(u)) + [EOS] for u in units]
    T = max(map(len, tgts))
    tgt_in = torch.full((len(units), T), PAD)
    targets = torch.full((len(units), T), -100)
    for i, t in enumerate(tgts):
        targets[i, : len(t)] = torch.tensor(t)
        tgt_in[i, 0] = BOS
        tgt_in[i, 1 : len(t)] = torch.tensor(t[:-1])
    return src, tgt_in, targets


class PigLatinBatches:
    """Seeded training batches; all sources of a batch have one length, so no source padding is needed
    (the reference model has no attention mask). Target padding sits after EOS, where the causal
    decoder never looks back at it, and is excluded from the loss."""

    def __init__(self, data: TaskData, batch: int, seed: int):
        self.lengths = sorted(data.train)
        self.weights = [len(data.train[n]) for n in self.lengths]  # a length as often as its units
        self.data, self.batch, self.rng = data, batch, random.Random(seed)

    def next(self):
        from ..data import Batch

        n = self.rng.choices(self.lengths, self.weights)[0]
        units = self.rng.choices(self.data.train[n], k=self.batch)
        src, tgt_in, targets = encode_pairs(units, self.data)
        return Batch((src, tgt_in), targets)


def heldout_batches(units: list[str], data: TaskData, batch: int) -> list:
    from ..data import Batch

    by_len: dict[int, list[str]] = defaultdict(list)
    for u in units:
        by_len[len(tokens(u))].append(u)
    out = []
    for n in sorted(by_len):
        group = by_len[n]
        for i in range(0, len(group), batch):
            src, tgt_in, targets = encode_pairs(group[i : i + batch], data)
            out.append(Batch((src, tgt_in), targets))
    return out


def greedy_decode(model, src, max_new: int) -> list[list[int]]:
    """Greedy decodes of a seq2seq model (no cache: the decoder reruns on the prefix): token ids up to EOS."""
    import torch

    with torch.no_grad():
        memory = model.encoder(src)
        out = torch.full((src.shape[0], 1), BOS, dtype=torch.long)
        done = torch.zeros(src.shape[0], dtype=torch.bool)
        for _ in range(max_new):
            nxt = model.output_projection(model.decoder(out, memory=memory)[:, -1]).argmax(-1)
            nxt = nxt.masked_fill(done, PAD)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if bool(done.all()):
                break
    rows = []
    for row in out[:, 1:].tolist():
        row = row[: row.index(EOS)] if EOS in row else row
        rows.append([t for t in row if t > PAD])
    return rows


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (default 13a tokenization), the field's standard scorer."""
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("BLEU needs sacrebleu: pip install residual-probe[study]") from None
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


# ---- runs ---------------------------------------------------------------------------------------

def run_name(task: str, placement: str, depth: int, warmup: bool, seed: int = 0) -> str:
    kind = f"E{depth}D{depth}" if task == "translation" else f"LM{depth}"
    return f"{kind}-{placement}-{'warmup' if warmup else 'nowarmup'}-s{seed}"


@dataclass(frozen=True)
class RunSpec:
    """One training run. task "translation" (seq2seq Pig Latin) or "lm" (the training study's decoder LM)."""

    task: str
    placement: str
    depth: int
    warmup: bool  # with the linear warm-up ramp
    seed: int = 0
    d_model: int = 64
    heads: int = 4
    ffn: int = 256
    steps: int = 400
    lr: float = 1e-3
    warmup_steps: int = 40  # length of the ramp; the decay after it is the same with or without
    schedule: str = "inverse_sqrt"  # or "constant" (the LM training study: constant lr, linear ramp)
    batch: int = 32
    seq_len: int = 64  # lm only
    dropout: float = 0.3
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    label_smoothing: float = 0.1
    weight_decay: float = 0.0  # the released config has 1e-4; over a few hundred steps it is negligible
    eval_every: int = 50
    probe_every: int = 10
    bleu_units: int = 200  # held-out units decoded greedily for BLEU (decoding dominates eval time)
    heldout_units: int = 256  # held-out units for the teacher-forced loss and accuracy
    max_bytes: int = 32
    alpha: float = 1.0  # ResiDual's weight of x in alpha * x + LN_f(d); 0 is the ablation without the x term

    @property
    def name(self) -> str:
        return run_name(self.task, self.placement, self.depth, self.warmup, self.seed) + (
            "" if self.alpha == 1.0 else f"-alpha{self.alpha:g}")

    def cost(self) -> float:
        """Relative compute, to start the longest runs first."""
        per = self.depth * (2 if self.task == "translation" else 1) * self.d_model**2
        return per * self.steps * self.batch * (self.seq_len if self.task == "lm" else 30)

    def model_config(self):
        from ..models import ModelConfig

        if self.task == "translation":  # the paper's IWSLT model (ModelConfig.iwslt) at this width and depth
            return ModelConfig.iwslt(placement=self.placement, depth=self.depth, d_model=self.d_model,
                                     heads=self.heads, ffn=self.ffn, dropout=self.dropout,
                                     attention_dropout=self.attention_dropout,
                                     activation_dropout=self.activation_dropout, max_len=64, alpha=self.alpha,
                                     vocab_size=len(task_data(self.max_bytes).vocab))
        return ModelConfig(arch="decoder", placement=self.placement, depth=self.depth, d_model=self.d_model,
                           heads=self.heads, ffn=self.ffn, dropout=self.dropout, attention_dropout=self.attention_dropout,
                           activation_dropout=self.activation_dropout, max_len=256)

    def build_model(self):
        from ..models import Transformer

        return Transformer(self.model_config())


def same_spec(saved: dict | None, spec: RunSpec) -> bool:
    """A saved run's spec equals `spec`; fields added to RunSpec later read as their defaults."""
    if saved is None:
        return False
    defaults = {f.name: f.default for f in fields(RunSpec) if f.default is not MISSING}
    return {**defaults, **saved} == asdict(spec)


def lr_at(step: int, spec: RunSpec) -> float:
    """Learning rate at 0-based `step`: inverse-sqrt (fairseq) with or without its linear ramp."""
    t, w = step + 1, spec.warmup_steps
    ramp = min(1.0, t / w) if spec.warmup and w else 1.0
    decay = min(1.0, math.sqrt(w / t)) if spec.schedule == "inverse_sqrt" and w else 1.0
    return spec.lr * ramp * decay


def smoothed_loss(model, batch, eps: float):
    import torch.nn.functional as F

    logits = model(*batch.inputs)
    return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100, label_smoothing=eps)


def evaluate(model, batches) -> tuple[float, float]:
    """(loss in nats per target token, token accuracy), teacher-forced, eval mode."""
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    tot, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(*b.inputs)
            mask = b.targets != -100
            tot += float(F.cross_entropy(logits[mask], b.targets[mask], reduction="sum"))
            correct += int((logits.argmax(-1)[mask] == b.targets[mask]).sum())
            n += int(mask.sum())
    model.train(was)
    return tot / n, correct / n


# ---- ResiDual's two streams ---------------------------------------------------------------------

def _run_stack(stack, tokens, memory=None):
    """A stack's forward, keeping each block's input state; returns (states, output).

    states[k] is block k's input ((x, d) for ResiDual), states[N] the last block's output.
    """
    states = [stack.placement.begin(stack.embed(tokens), stack)]
    for block in stack.layers:
        states.append(block(states[-1], memory))
    return states, stack.placement.end(states[-1], stack)


def stream_diagnostics(model, batch) -> list[dict]:
    """ResiDual's streams on one held-out batch (eval mode), per stack: rows {stack, layer, quantity, value}.

    - grad_x_total / grad_d_total[k]: RMS over tokens of ||dL/dx_k||, ||dL/dd_k|| at block k's output.
    - grad_x_path[k]: the same for the x stream alone (the Post-LN half): dL/d(alpha x_N) carried back
      through the blocks' x -> x Jacobians only (a vector-Jacobian product per block with the d
      output's cotangent 0), i.e. what the gradient would be if the blocks fed only the x stream.
    - out_rms_x, out_rms_d (layer -1): RMS norm per token of alpha * x_N and LN_f(d_N) in the output.
    - ablate_x, ablate_d (final stack only): held-out loss increase when alpha * x_N (or LN_f(d_N)) is
      replaced by its mean over tokens (mean ablation), in nats per token.
    """
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    rows = []
    try:
        seq2seq = model.cfg.arch == "seq2seq"
        with torch.enable_grad():
            if seq2seq:
                src, tgt_in = batch.inputs
                enc_states, enc_out = _run_stack(model.encoder, src)
                dec_states, dec_out = _run_stack(model.decoder, tgt_in, enc_out)
                runs = [("encoder", model.encoder, enc_states, enc_out, None), ("decoder", model.decoder, dec_states, dec_out, enc_out)]
            else:
                dec_states, dec_out = _run_stack(model.decoder, batch.inputs[0])
                runs = [("decoder", model.decoder, dec_states, dec_out, None)]
            mask = batch.targets != -100
            logits = model.output_projection(dec_out)
            loss = F.cross_entropy(logits[mask], batch.targets[mask])
            flat = [t for _, _, states, out, _ in runs for s in states[1:] for t in s] + [out for *_, out, _ in runs]
            grads = torch.autograd.grad(loss, flat)
        g = iter(grads)
        per_stack = {}
        for name, stack, states, out, _ in runs:
            for k in range(len(states) - 1):
                gx, gd = next(g), next(g)
                rows += [dict(stack=name, layer=k, quantity="grad_x_total", value=_rms(gx)),
                         dict(stack=name, layer=k, quantity="grad_d_total", value=_rms(gd))]
        for (name, stack, states, out, memory), g_out in zip(runs, g):
            alpha = model.cfg.alpha
            v = alpha * g_out  # dL/dx_N through the alpha * x_N term alone
            for k in range(len(states) - 2, -1, -1):  # block k: states[k] -> states[k + 1]
                rows.append(dict(stack=name, layer=k, quantity="grad_x_path", value=_rms(v)))
                if k == 0:
                    break
                x_in = states[k][0].detach().requires_grad_(True)
                d_in = states[k][1].detach()
                with torch.enable_grad():
                    x_out, _ = stack.layers[k]((x_in, d_in), memory.detach() if memory is not None else None)
                    (v,) = torch.autograd.grad(x_out, x_in, grad_outputs=v)
            x_n, d_n = states[-1]
            with torch.no_grad():
                ax, ld = alpha * x_n, stack.final_norm(d_n)
                rows += [dict(stack=name, layer=-1, quantity="out_rms_x", value=_rms(ax)),
                         dict(stack=name, layer=-1, quantity="out_rms_d", value=_rms(ld))]
                per_stack[name] = (ax, ld)
        with torch.no_grad():
            ax, ld = per_stack["decoder"]
            base = float(loss)
            for q, h in (("ablate_x", ax.mean(dim=(0, 1), keepdim=True).expand_as(ax) + ld),
                         ("ablate_d", ax + ld.mean(dim=(0, 1), keepdim=True).expand_as(ld))):
                lg = model.output_projection(h)
                rows.append(dict(stack="decoder", layer=-1, quantity=q,
                                 value=float(F.cross_entropy(lg[mask], batch.targets[mask])) - base))
    finally:
        model.train(was)
    return rows


def _rms(t) -> float:
    """RMS over tokens of the per-token L2 norm of t (..., d)."""
    return float(t.detach().double().pow(2).sum(-1).mean().sqrt())


# ---- one run ------------------------------------------------------------------------------------

PROBE_METRICS = ("param_grad_norm", "act_grad_norm", "block_influence", "ln_update")


def run_one(spec: RunSpec, run_dir: Path) -> dict:
    """Train, evaluate and record one run into run_dir; returns the result (also result.json).

    A result.json already there (same spec) is returned without training: the grid resumes.
    """
    import torch

    from ..probe import Probe
    from ..output import write_csv, write_json

    done = run_dir / "result.json"
    if done.is_file():
        res = json.loads(done.read_text())
        if same_spec(res.get("spec"), spec):
            return res
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    model = spec.build_model()
    cfg = model.cfg
    if spec.task == "translation":
        data = task_data(spec.max_bytes)
        train = PigLatinBatches(data, spec.batch, spec.seed)
        rng = random.Random(1234)  # the same held-out subsets for every run
        held = heldout_batches(sorted(rng.sample(data.heldout, min(spec.heldout_units, len(data.heldout)))), data, 64)
        bleu_units = sorted(random.Random(99).sample(data.heldout, min(spec.bleu_units, len(data.heldout))))
    else:
        from ..data import BatchSource, builtin_corpus, split_tokens

        train_text, val_text = split_tokens(builtin_corpus())
        train = BatchSource("decoder", spec.batch, spec.seq_len, cfg.vocab_size, spec.seed, train_text)
        held = [BatchSource("decoder", spec.batch, spec.seq_len, cfg.vocab_size, 10_000 + i, val_text).next()
                for i in range(4)]  # as the training study's held-out batches
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), eps=1e-8,
                           weight_decay=spec.weight_decay)  # as training.Trainer (weight decay 0 here)
    probe = Probe(model, quantities=("param_grad_norm", "act_grad_norm", "forward_stats"), every=spec.probe_every)
    two_streams = spec.placement == "residual"
    curve, streams = [], []
    diverged = None

    def record_eval(step: int) -> None:
        loss, acc = evaluate(model, held)
        curve.append(dict(step=step, lr=lr_at(max(step - 1, 0), spec), train_loss=math.nan,
                          heldout_loss=loss, heldout_acc=acc))
        if two_streams:
            for r in stream_diagnostics(model, held[0]):
                streams.append(dict(step=step, **r))

    t0 = time.perf_counter()
    record_eval(0)
    losses = []
    with probe:
        model.train()
        for step in range(spec.steps):
            lr = lr_at(step, spec)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = smoothed_loss(model, train.next(), spec.label_smoothing)
            loss.backward()
            probe.step()  # after backward, before the update (no clipping: clip_norm 0 in the paper)
            opt.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                diverged = step
                break
            if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
                with probe.paused():  # held-out forwards are not training statistics
                    record_eval(step + 1)
                curve[-1]["train_loss"] = float(np.mean(losses[-spec.eval_every:]))
    train_seconds = time.perf_counter() - t0
    result = dict(spec=asdict(spec), name=spec.name, diverged_at_step=diverged, steps_done=len(losses),
                  train_seconds=round(train_seconds, 1), parameters=sum(p.numel() for p in model.parameters()))
    if diverged is None:
        result["heldout_loss"], result["heldout_acc"] = curve[-1]["heldout_loss"], curve[-1]["heldout_acc"]
    else:
        result["heldout_loss"], result["heldout_acc"] = math.nan, math.nan
    if spec.task == "translation":
        t1 = time.perf_counter()
        model.eval()
        srcs, hyps, refs = [], [], []
        if diverged is None:
            for b in heldout_batches(bleu_units, data, 64):
                src = b.inputs[0]
                hyps += [" ".join(data.vocab[t] for t in row) for row in greedy_decode(model, src, src.shape[1] + 4)]
                srcs += [" ".join(data.vocab[t] for t in row) for row in src.tolist()]
                refs += [" ".join(target_tokens(u)) for u in srcs[len(refs):]]
            result["bleu"] = corpus_bleu(hyps, refs)
        else:
            result["bleu"] = 0.0  # a diverged model decodes nothing
        result["samples"] = [dict(source=s, reference=r, output=h) for s, r, h in list(zip(srcs, refs, hyps))[::40]]
        result["decode_seconds"] = round(time.perf_counter() - t1, 1)
        result["sentences"] = list(data.sentences)
        result["units"] = dict(train=sum(map(len, data.train.values())), heldout=len(data.heldout))
    keep = [r for r in probe.rows() if r["metric"] in PROBE_METRICS
            and (r["metric"] != "param_grad_norm" or r["sublayer"] == "block")]
    write_csv(run_dir / "probe.csv", keep, ("step", "stack", "layer", "sublayer", "stream", "metric", "value"))
    write_csv(run_dir / "curve.csv", curve, ("step", "lr", "train_loss", "heldout_loss", "heldout_acc"))
    if streams:
        write_csv(run_dir / "streams.csv", streams, ("step", "stack", "layer", "quantity", "value"))
    write_json(done, result)  # last: its presence marks the run finished
    return result


def unigram_loss(data: TaskData) -> float:
    """Held-out loss (nats per target token) of the training targets' token frequencies, no context:
    a run that does not beat it learned nothing from the source or the prefix."""
    counts = np.ones(len(data.vocab))
    for units in data.train.values():
        for u in units:
            np.add.at(counts, data.ids(target_tokens(u)) + [EOS], 1)
    logp = np.log(counts / counts.sum())
    held = [t for u in data.heldout for t in data.ids(target_tokens(u)) + [EOS]]
    return float(-logp[held].mean())


# ---- the grid -----------------------------------------------------------------------------------

def grid(quick: bool) -> list[RunSpec]:
    """The runs: translation depth x placement x warm-up x seed, then the LM runs for the explanation."""
    if quick:
        tr = dict(d_model=16, heads=2, ffn=32, steps=20, warmup_steps=4, batch=8, eval_every=10, probe_every=5,
                  bleu_units=8, heldout_units=32)
        depths, seeds = (1, 2), (0,)
        lm = dict(d_model=16, heads=2, ffn=32, steps=20, batch=4, seq_len=16, eval_every=10, probe_every=5)
        lm_depths = (2, 1)
    else:
        tr = dict(steps=STEPS, warmup_steps=STEPS // 10, lr=2e-3, batch=32, bleu_units=512, heldout_units=512,
                  eval_every=100)
        depths, seeds = (6, 12), (0, 1)
        # the decoder-only training study's setting (24 blocks; constant lr 1e-3, no warm-up, no
        # dropout or smoothing), and the same LM at the paper's depth, 6 blocks
        lm = dict(d_model=128, heads=4, ffn=512, steps=600, batch=16, seq_len=64, eval_every=50, probe_every=10)
        lm_depths = (24, 6)
    specs = [RunSpec("translation", p, n, w, seed=s, **tr)
             for n in depths for p in PLACEMENTS for w in (True, False) for s in seeds]
    # the ablation behind the explanation: ResiDual without its alpha * x output term
    specs += [RunSpec("translation", "residual", depths[0], True, seed=s, alpha=0.0, **tr) for s in seeds]
    lm_common = dict(lr=1e-3, schedule="constant", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     label_smoothing=0.0, warmup_steps=0)
    specs += [RunSpec("lm", p, n, False, seed=0, **lm, **lm_common) for n in lm_depths for p in ("residual", "pre-ln")]
    return specs


STEPS = 1200  # translation steps per run (full); the budget: the whole grid in < 60 min on 2 cores


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one core per run: two runs in parallel use two cores best at this size


def _run_in_worker(spec: RunSpec, run_dir: str) -> dict:
    return run_one(spec, Path(run_dir))


def run_grid(specs: list[RunSpec], root: Path, workers: int = 1, echo=print) -> list[dict]:
    """Run (or resume) every spec into root/<name>/, `workers` processes in parallel.

    Order: what the checks need first, so that an interrupted grid leaves a usable partial one
    (translation seed 0 and the deep ResiDual LM, then the other seeds, then the other LM runs),
    longest first within a tier.
    """
    lm_deep = max((s.depth for s in specs if s.task == "lm"), default=0)

    def tier(s: RunSpec) -> int:
        if s.task == "translation":
            return 0 if s.seed == 0 else 1
        if s.depth == lm_deep:
            return 0 if s.placement == "residual" else 3
        return 2

    order = sorted(specs, key=lambda s: (tier(s), -s.cost()))
    results: dict[str, dict] = {}
    if workers <= 1:
        for i, spec in enumerate(order):
            results[spec.name] = run_one(spec, root / spec.name)
            echo(_progress(i + 1, len(order), results[spec.name]))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(_run_in_worker, spec, str(root / spec.name)): spec for spec in order}
            for i, fut in enumerate(as_completed(futures)):
                res = fut.result()
                results[res["name"]] = res
                echo(_progress(i + 1, len(order), res))
    return [results[s.name] for s in specs]


def _progress(i: int, n: int, r: dict) -> str:
    bleu = f" BLEU {r['bleu']:.2f}" if "bleu" in r else ""
    return (f"[{i}/{n}] {r['name']}: held-out loss {r['heldout_loss']:.3f}, acc {r['heldout_acc']:.3f}{bleu}"
            f", {r['train_seconds']:.0f} s" + (f", diverged at {r['diverged_at_step']}" if r["diverged_at_step"] is not None else ""))


# ---- tables and checks --------------------------------------------------------------------------

def run_rows(results: list[dict], unigram: float) -> list[dict]:
    """One row per translation run; failed: diverged, or held-out loss no better than byte frequencies."""
    rows = []
    for r in results:
        s = r["spec"]
        if s["task"] != "translation" or s.get("alpha", 1.0) != 1.0:  # the ablation has its own check
            continue
        loss = r["heldout_loss"]
        rows.append(dict(depth=s["depth"], placement=s["placement"], warmup="yes" if s["warmup"] else "no",
                         seed=s["seed"], heldout_loss=loss, heldout_acc=r["heldout_acc"], bleu=r["bleu"],
                         diverged_at_step=r["diverged_at_step"] if r["diverged_at_step"] is not None else "",
                         failed="yes" if not (math.isfinite(loss) and loss < unigram) else "no",
                         train_seconds=r["train_seconds"], decode_seconds=r["decode_seconds"]))
    return rows


def table_rows(rows: list[dict]) -> list[dict]:
    """Ours beside the paper's: one row per depth x placement x warm-up, means over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["depth"], r["placement"], r["warmup"]].append(r)
    out = []
    for (n, p, w), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2] == "no", PLACEMENTS.index(kv[0][1]))):
        bleu = np.array([r["bleu"] for r in rs])
        paper = PAPER_BLEU.get((n, p, w == "yes"))
        out.append(dict(model=f"E{n}D{n}", placement=p, warmup=w, seeds=len(rs),
                        bleu_mean=float(bleu.mean()), bleu_sd=float(bleu.std(ddof=1)) if len(rs) > 1 else math.nan,
                        bleu_per_seed=" ".join(f"{b:.2f}" for b in bleu),
                        heldout_loss=float(np.mean([r["heldout_loss"] for r in rs])),
                        heldout_acc=float(np.mean([r["heldout_acc"] for r in rs])),
                        failed=sum(r["failed"] == "yes" for r in rs),
                        paper_bleu="" if paper is None else paper))
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}g}"


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def translation_checks(table: list[dict], where: str) -> list[Check]:
    """The paper's table, claim by claim, on BLEU (the verdict); held-out loss is given beside it.

    A claim whose runs did not all finish (a partial grid) has the agreement "not run".
    """
    t = {(int(r["model"][1:].split("D")[0]), r["placement"], r["warmup"] == "yes"): r for r in table}
    missing = dict(bleu_mean=math.nan, bleu_per_seed="not run", heldout_loss=math.nan, failed=0, seeds=0)
    for n in {k[0] for k in t}:  # a partial grid: runs not finished read as nan
        for p in PLACEMENTS:
            for w in (True, False):
                t.setdefault((n, p, w), missing)
    b = {k: r["bleu_mean"] for k, r in t.items()}
    loss = lambda *ks: " / ".join(_fmt(t[k]["heldout_loss"]) for k in ks)  # noqa: E731
    seeds = lambda *ks: " | ".join(str(t[k]["bleu_per_seed"]) for k in ks)  # noqa: E731

    def verdict(ok: bool, *keys) -> str:
        return "not run" if any(t[k]["seeds"] == 0 for k in keys) else _yes(ok)

    checks = []
    n0, n1 = min(k[0] for k in t), max(k[0] for k in t)
    res, pre, post = (n0, "residual", True), (n0, "pre-ln", True), (n0, "post-ln", True)
    checks.append(Check(
        f"ResiDual >= Pre-LN and Post-LN at E{n0}D{n0} (BLEU, warm-up)", where, "residual",
        "paper: 35.63 vs 35.12 / 35.37",
        f"BLEU {b[res]:.2f} vs {b[pre]:.2f} / {b[post]:.2f} (per seed {seeds(res, pre, post)}); "
        f"held-out loss {loss(res, pre, post)}", verdict(b[res] >= b[pre] and b[res] >= b[post], res, pre, post)))
    post1, pre1, res1 = (n1, "post-ln", True), (n1, "pre-ln", True), (n1, "residual", True)
    checks.append(Check(
        f"Post-LN fails or trails at E{n1}D{n1} (warm-up)", where, "post-ln",
        "paper: fails to train; here: a failed seed, or BLEU below Pre-LN and ResiDual",
        f"BLEU {b[post1]:.2f} vs {b[pre1]:.2f} / {b[res1]:.2f}; held-out loss {loss(post1, pre1, res1)}; "
        f"failed seeds {t[post1]['failed']}/{t[post1]['seeds']}",
        verdict(t[post1]["failed"] > 0 or b[post1] < min(b[pre1], b[res1]), post1, pre1, res1)))
    checks.append(Check(
        f"ResiDual >= Pre-LN at E{n1}D{n1} (BLEU, warm-up)", where, "residual", "paper: 36.09 vs 35.18",
        f"BLEU {b[res1]:.2f} vs {b[pre1]:.2f} (per seed {seeds(res1, pre1)}); held-out loss {loss(res1, pre1)}",
        verdict(b[res1] >= b[pre1], res1, pre1)))
    for n, paper in ((n0, "Pre-LN -2.84, ResiDual +0.13"), (n1, "Pre-LN -3.36, ResiDual -0.52")):
        keys = [(n, p, w) for p in ("residual", "pre-ln") for w in (True, False)]
        d_res = b[n, "residual", False] - b[n, "residual", True]
        d_pre = b[n, "pre-ln", False] - b[n, "pre-ln", True]
        l_res = t[n, "residual", False]["heldout_loss"] - t[n, "residual", True]["heldout_loss"]
        l_pre = t[n, "pre-ln", False]["heldout_loss"] - t[n, "pre-ln", True]["heldout_loss"]
        checks.append(Check(
            f"Without warm-up ResiDual loses less BLEU than Pre-LN at E{n}D{n}", where, "residual",
            f"paper: {paper}", f"BLEU Pre-LN {d_pre:+.2f}, ResiDual {d_res:+.2f}; held-out loss Pre-LN "
            f"{l_pre:+.3f}, ResiDual {l_res:+.3f}", verdict(d_res > d_pre, *keys)))
    return checks


def ablation_checks(by_name: dict[str, dict], specs: list[RunSpec], where: str) -> list[Check]:
    """ResiDual with and without its alpha * x output term, same depth, warm-up and seeds (and Pre-LN beside)."""
    abl = [s for s in specs if s.task == "translation" and s.alpha != 1.0]
    if not abl:
        return []
    n = abl[0].depth
    arms = {"alpha 0": [s.name for s in abl],
            "alpha 1": [run_name("translation", "residual", n, True, s.seed) for s in abl],
            "Pre-LN": [run_name("translation", "pre-ln", n, True, s.seed) for s in abl]}
    got = {arm: [by_name[r] for r in names if r in by_name] for arm, names in arms.items()}
    bleu = {arm: float(np.mean([r["bleu"] for r in rs])) if rs else math.nan for arm, rs in got.items()}
    loss = {arm: float(np.mean([r["heldout_loss"] for r in rs])) if rs else math.nan for arm, rs in got.items()}
    per_seed = " | ".join(" ".join(f"{r['bleu']:.2f}" for r in rs) for rs in got.values())
    done = all(len(rs) == len(abl) for rs in got.values())
    return [Check(
        f"ResiDual without its alpha*x output term trains better at E{n}D{n} (warm-up): the x term holds it back",
        where, "residual", "explanation of the gap to Pre-LN: BLEU with alpha = 0 above alpha = 1",
        f"BLEU alpha=0 {bleu['alpha 0']:.2f}, alpha=1 {bleu['alpha 1']:.2f}, Pre-LN {bleu['Pre-LN']:.2f} "
        f"(per seed {per_seed}); held-out loss {_fmt(loss['alpha 0'])} / {_fmt(loss['alpha 1'])} / "
        f"{_fmt(loss['Pre-LN'])}", _yes(bleu["alpha 0"] > bleu["alpha 1"]) if done else "not run")]


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _profile(rows: Iterable[dict], metric: str, stack: str, stream: str = "x") -> dict[int, dict[int, float]]:
    """{step: {block: value}} of one probe metric (param_grad_norm: whole block)."""
    out: dict[int, dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r["metric"] == metric and r["stack"] == stack and r["stream"] in (stream, "-") and r["sublayer"] == "block":
            out[int(r["step"])][int(r["layer"])] = float(r["value"])
    return dict(out)


def first_last(prof: dict[int, dict[int, float]]) -> dict[int, float]:
    return {s: v[min(v)] / v[max(v)] if v[max(v)] else math.nan for s, v in sorted(prof.items())}


def stream_summary(rows: list[dict], stack: str = "decoder") -> dict[int, dict[str, float]]:
    """Per evaluation step: x-path and d-stream gradient block 0 / last block, output RMS and ablations."""
    q: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["stack"] == stack:
            q[r["quantity"]][int(r["step"])][int(r["layer"])] = float(r["value"])
    out = {}
    for step in sorted(q["grad_x_path"]):
        xp, dt, xt = q["grad_x_path"][step], q["grad_d_total"][step], q["grad_x_total"][step]
        top = max(xp)
        out[step] = dict(x_path_first_last=xp[0] / xp[top], d_total_first_last=dt[0] / dt[top],
                         x_total_first_last=xt[0] / xt[top], x_path_first_over_d=xp[0] / dt[0],
                         out_rms_x=q["out_rms_x"][step][-1], out_rms_d=q["out_rms_d"][step][-1],
                         ablate_x=q["ablate_x"][step].get(-1, math.nan), ablate_d=q["ablate_d"][step].get(-1, math.nan))
    return out


def finished(specs: list[RunSpec], root: Path) -> list[dict]:
    """Results of the runs that finished (result.json written with the same spec)."""
    out = []
    for spec in specs:
        f = root / spec.name / "result.json"
        if f.is_file():
            r = json.loads(f.read_text())
            if same_spec(r.get("spec"), spec):
                out.append(r)
    return out


def run(out: Path, quick: bool = False, workers: int | None = None, echo=print, train: bool = True) -> list[Check]:
    """Run (or resume) the grid into out/runs/translation/, then write tables, figures and checks.

    train=False writes them from the runs finished so far (a partial grid), training nothing.
    """
    import os

    from ..output import write_csv, write_json

    out = Path(out)
    root = out / "runs" / ("translation-quick" if quick else "translation")
    specs = grid(quick)
    if workers is None:
        workers = 1 if quick else min(2, os.cpu_count() or 1)
    t0 = time.perf_counter()
    results = run_grid(specs, root, workers, echo) if train else finished(specs, root)
    wall = time.perf_counter() - t0
    missing = sorted({s.name for s in specs} - {r["name"] for r in results})
    if missing:
        echo(f"translation: {len(missing)} of {len(specs)} runs not finished: {', '.join(missing)}")
    by_name = {r["name"]: r for r in results}
    specs = [s for s in specs if s.name in by_name]
    if not any(s.task == "translation" for s in specs):
        echo("translation: no finished translation run; nothing to write")
        return []
    data = task_data(specs[0].max_bytes)
    unigram = unigram_loss(data)
    runs = run_rows(results, unigram)
    table = table_rows(runs)
    write_csv(out / "translation_runs.csv", runs, list(runs[0]))
    write_csv(out / "translation_table.csv", table, list(table[0]))

    # curves, probe extracts and stream rows, all runs in one file each (tidy, with the run's name)
    curves, probes, streams = {}, {}, {}
    for s in specs:
        d = root / s.name
        curves[s.name] = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
                          for r in _read_csv(d / "curve.csv")]
        probes[s.name] = _read_csv(d / "probe.csv")
        streams[s.name] = _read_csv(d / "streams.csv")
    write_csv(out / "translation_curves.csv", [dict(run=n, **r) for n, rs in curves.items() for r in rs],
              ("run", "step", "lr", "train_loss", "heldout_loss", "heldout_acc"))
    # an extract (the full logs stay in runs/): every recorded step up to 50, then every 100th and
    # the last, values to 6 significant digits, so the committed table stays small (~3 MB)
    probe_rows = []
    for n, rs in probes.items():
        if rs:
            last = max(int(r["step"]) for r in rs)
            probe_rows += [{"run": n, **r, "value": f"{float(r['value']):.6g}"} for r in rs
                           if int(r["step"]) <= 50 or int(r["step"]) % 100 == 0 or int(r["step"]) == last]
    write_csv(out / "translation_probe.csv", probe_rows, ("run", "step", "stack", "layer", "sublayer", "stream", "metric", "value"))
    write_csv(out / "translation_streams.csv", [dict(run=n, **r) for n, rs in streams.items() for r in rs],
              ("run", "step", "stack", "layer", "quantity", "value"))
    grid_specs = [s for s in specs if s.alpha == 1.0]  # the figures show the paper's grid; the ablation is a check
    figures(out, grid_specs, table, runs, {s.name: curves[s.name] for s in grid_specs}, probes, streams)

    tr = [s for s in specs if s.task == "translation"]
    n1 = max(s.depth for s in tr)
    checks = translation_checks(table, f"Pig Latin seq2seq, {_size_text(tr[0])}, {len({s.seed for s in tr})} seeds")
    checks += ablation_checks(by_name, specs, f"Pig Latin seq2seq, {_size_text(tr[0])}")
    checks += lm_checks(by_name, streams, [s for s in grid(quick) if s.task == "lm"], n1, out)
    write_json(out / "translation.json", dict(
        study="translation", quick=quick, wall_seconds=round(wall, 1), workers=workers, unigram_loss=unigram,
        missing_runs=missing, sentences=dict(train=data.sentences[0], heldout=data.sentences[1]),
        units=dict(train=sum(map(len, data.train.values())), heldout=len(data.heldout)), runs=by_name))
    return checks


def _size_text(s: RunSpec) -> str:
    return f"d {s.d_model}, FFN {s.ffn}, {s.steps} steps, peak lr {s.lr:g}"


def figures(out: Path, specs: list[RunSpec], table, runs, curves, probes, streams) -> None:
    from ..plots.translation import plot_bleu, plot_curves, plot_gradients, plot_influence, plot_streams

    tr = [s for s in specs if s.task == "translation"]
    n1 = max(s.depth for s in tr)
    plot_bleu(table, runs, out / "translation_bleu")
    plot_curves(curves, {s.name: asdict(s) for s in specs}, out / "translation_curves")
    deep = {p: run_name("translation", p, n1, True) for p in PLACEMENTS}
    profiles, influence = {}, {}
    for p, name in deep.items():
        for stack in ("encoder", "decoder"):
            prof = _profile(probes.get(name, []), "param_grad_norm", stack)
            steps = sorted(prof)
            pick = sorted({steps[0], steps[min(1, len(steps) - 1)], steps[len(steps) // 4], steps[-1]}) if steps else []
            profiles[f"{p} {stack}"] = {s: prof[s] for s in pick}
            for stream in (("x", "d") if p == "residual" else ("x",)):
                inf = _profile(probes.get(name, []), "block_influence", stack, stream)
                if inf:
                    influence.setdefault(p, {})[f"{stack} {stream}"] = inf[max(inf)]
    ratios = {}
    for s in tr:
        if s.depth == n1:
            key = f"{s.placement} {'warm-up' if s.warmup else 'no warm-up'} s{s.seed}"
            ratios[key] = {st: first_last(_profile(probes[s.name], "param_grad_norm", st)) for st in ("encoder", "decoder")}
    plot_gradients(profiles, ratios, f"E{n1}D{n1} during training ({_size_text(tr[0])}); profiles: warm-up, seed 0",
                   out / "translation_grads")
    plot_influence(influence, f"Block influence at the last recorded step, E{n1}D{n1}, warm-up, seed 0 "
                   "(training batches, dropout on)", out / "translation_collapse")
    lm = sorted({s.depth for s in specs if s.task == "lm"}, reverse=True)
    panels = {f"decoder-only LM, {n} blocks": run_name("lm", "residual", n, False) for n in lm}
    panels[f"E{n1}D{n1} decoder, warm-up"] = deep["residual"]
    panels[f"E{n1}D{n1} decoder, no warm-up"] = run_name("translation", "residual", n1, False)
    plot_streams({t: [r for r in streams.get(n, []) if r["stack"] == "decoder"] for t, n in panels.items()
                  if streams.get(n)}, out / "translation_streams")


def _training_study_loss(out: Path, spec: RunSpec) -> float:
    """The training study's held-out loss for `spec`'s placement when it is the same run (24 blocks,
    d 128, 600 steps, lr 1e-3, no warm-up, seed 0): a Pre-LN LM this grid did not get to."""
    same = (spec.depth, spec.d_model, spec.steps, spec.lr, spec.batch, spec.seq_len) == (24, 128, 600, 1e-3, 16, 64)
    for r in _read_csv(out / "training_study.csv") if same else []:
        if r["placement"] == spec.placement and r["warmup"] == "0":
            return float(r["final_val_loss"])
    return math.nan


def lm_checks(by_name: dict, streams: dict, lm: list[RunSpec], n1: int, out: Path) -> list[Check]:
    """The LM result explained: the gap, the x stream's gradient and its share of the output."""
    if not lm:
        return []
    deep, paper = max(s.depth for s in lm), min(s.depth for s in lm)
    name = lambda task, p, n, w=False: run_name(task, p, n, w)  # noqa: E731
    nan = dict(heldout_loss=math.nan)
    loss = {(p, n): by_name.get(name("lm", p, n), nan)["heldout_loss"] for p in ("residual", "pre-ln") for n in (deep, paper)}
    source = ""
    if not math.isfinite(loss["pre-ln", deep]):
        spec = next(s for s in lm if s.depth == deep and s.placement == "pre-ln")
        loss["pre-ln", deep] = _training_study_loss(out, spec)
        source = " (Pre-LN from training_study.csv, the same run)" if math.isfinite(loss["pre-ln", deep]) else ""
    gap = {n: loss["residual", n] - loss["pre-ln", n] for n in (deep, paper)}
    size = f"d {lm[0].d_model}, {lm[0].steps} steps, lr {lm[0].lr:g} constant"
    ran = lambda *vals: all(math.isfinite(v) for v in vals)  # noqa: E731
    checks = [
        Check(f"ResiDual trails Pre-LN in the decoder-only LM ({deep} blocks)", f"decoder LM N={deep}, {size}",
              "residual", "training study: 1.76 vs 1.51 nats/byte",
              f"{loss['residual', deep]:.3f} vs {loss['pre-ln', deep]:.3f} (gap {gap[deep]:+.3f}){source}",
              _yes(gap[deep] > 0) if ran(gap[deep]) else "not run"),
        Check(f"The LM gap shrinks at the paper's depth ({paper} blocks)", f"decoder LM N={paper} vs {deep}, {size}",
              "residual", f"gap at {paper} blocks < gap at {deep}",
              f"{gap[paper]:+.3f} vs {gap[deep]:+.3f} nats/byte ({loss['residual', paper]:.3f} vs {loss['pre-ln', paper]:.3f})",
              _yes(gap[paper] < gap[deep]) if ran(gap[paper], gap[deep]) else "not run"),
    ]
    for title, run, setting in (
            (f"LM, {deep} blocks", name("lm", "residual", deep), f"decoder LM N={deep}, {size}"),
            (f"E{n1}D{n1} decoder", name("translation", "residual", n1, True), f"Pig Latin E{n1}D{n1}, warm-up, seed 0")):
        summ = stream_summary(streams.get(run, []))
        if not summ:
            continue
        first, last = summ[min(summ)], summ[max(summ)]
        checks.append(Check(
            f"ResiDual's x stream (its Post-LN half) vanishes toward the input during training ({title})", setting,
            "residual", "x-path gradient, block 0 / last block < 0.1 at the end (Post-LN-like)",
            f"{_fmt(first['x_path_first_last'])} at step {min(summ)} -> {_fmt(last['x_path_first_last'])} at step "
            f"{max(summ)}; d stream {_fmt(last['d_total_first_last'])}", _yes(last["x_path_first_last"] < 0.1)))
        checks.append(Check(
            f"ResiDual's output relies on LN_f(d) more than on alpha*x ({title})", setting, "residual",
            "held-out loss increase from mean-ablating alpha*x < from mean-ablating LN_f(d)",
            f"+{_fmt(last['ablate_x'])} vs +{_fmt(last['ablate_d'])} nats at step {max(summ)}; RMS "
            f"{_fmt(last['out_rms_x'])} vs {_fmt(last['out_rms_d'])}", _yes(last["ablate_x"] < last["ablate_d"])))
    return checks
