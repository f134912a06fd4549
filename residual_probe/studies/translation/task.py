"""The task: CPython's documentation prose translated into Pig Latin, word by word.

Sentences of CPython's documentation (`pydoc_data.topics`, shipped with every CPython),
lowercased and cut into clauses of at most 32 bytes, are translated into Pig Latin: a word moves
its onset (the consonants before the first vowel) to the end and adds "ay" ("the" -> "ethay"),
a vowel-initial word adds "way". Tokens are words and punctuation marks in one joint dictionary
(as fairseq's joined dictionary with shared embeddings), so this is word-by-word translation
into a language with its own vocabulary: deterministic and linguistically shaped (the onset/rime
split of English syllables), not a copy (every word becomes another token; punctuation stays), and
the decoder needs the source at every step (nothing in the target prefix tells which word comes
next). Held-out sentences (10 %, chosen by a hash of the sentence) are never seen in training;
held-out clauses with a word unseen in training are dropped (its Pig Latin is not in the
dictionary). A byte-level version did not learn to read the source on CPU budgets; words make
sequences ~5x shorter.

That word-level task is a monotone one-to-one lookup: depth buys nothing on it (issue 34). The
variant "pig-latin-chars" (`CharTokens`) writes the same units as characters, with the space as
the word-separator token, so the model must apply the rule to each word's letters rather than
look the word up; `TASKS` names the variants, `DEFAULT_TASK` is the word-level one.
"""

from __future__ import annotations

import functools
import math
import random
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

BOS, EOS, PAD = 0, 1, 2  # the first ids of the task's dictionary (SPECIALS)
VOWELS = frozenset("aeiou")


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
            if (
                s
                and s.isascii()
                and s.isprintable()
                and s[0].isupper()
                and s[-1] in ".!?"
                and sum(c.isalpha() or c == " " for c in s) >= 0.85 * len(s)
            ):
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


class WordTokens:
    """Words and punctuation marks as tokens: the word-level task ("pig-latin-words")."""

    name = "pig-latin-words"

    def source(self, unit: str) -> list[str]:
        return tokens(unit)

    def target(self, unit: str) -> list[str]:
        return target_tokens(unit)

    def text(self, toks: list[str]) -> str:
        """Target tokens as the text BLEU scores (13a re-splits the punctuation it joins)."""
        return " ".join(toks)

    def max_new(self, n: int) -> int:
        """Decoding steps for a source of n tokens: the target has n tokens, then EOS."""
        return n + 4


class CharTokens:
    """Characters as tokens, the space the word-separator token ("pig-latin-chars"): the model must
    apply the rule to the letters of each word, so a held-out word never seen in training has a
    target the model can write (its characters are in the dictionary) and is kept."""

    name = "pig-latin-chars"

    def source(self, unit: str) -> list[str]:
        return list(unit)

    def target(self, unit: str) -> list[str]:
        return list(pig_latin(unit))

    def text(self, toks: list[str]) -> str:
        return "".join(toks)

    def max_new(self, n: int) -> int:
        """Decoding steps for a source of n characters: a word of k letters becomes at most k + 3,
        and n characters hold at most (n + 1) // 2 words; then EOS."""
        return n + 3 * ((n + 1) // 2) + 1


TASKS = {t.name: t for t in (WordTokens(), CharTokens())}
DEFAULT_TASK = WordTokens.name


@dataclass
class TaskData:
    train: dict[int, list[str]]  # source length in tokens -> training units of that length
    heldout: list[str]  # held-out units: from held-out sentences, not in training, every word known
    sentences: tuple[int, int]  # (training, held-out) sentence counts
    vocab: list[str]  # one joint dictionary (fairseq's joined dictionary, shared embeddings)
    scheme: WordTokens | CharTokens = TASKS[DEFAULT_TASK]  # how a unit becomes tokens and back
    unseen_kept: int = 0  # held-out units kept that hold a word never seen in training

    def __post_init__(self):
        self.index = {t: i for i, t in enumerate(self.vocab)}

    def ids(self, toks: list[str]) -> list[int]:
        return [self.index[t] for t in toks]


@functools.lru_cache(maxsize=8)
def task_data(
    max_bytes: int = 32, min_bytes: int = 12, holdout_per_mille: int = 100, task: str = DEFAULT_TASK
) -> TaskData:
    """Units of the prose sentences, split by sentence (a stable hash puts ~10 % of sentences in
    held-out; a held-out unit that also occurs in a training sentence is not held out).

    The dictionary holds the training units' source and target tokens; a held-out unit with a token
    not in it is dropped. Words as tokens ("pig-latin-words"): a held-out unit with a word never
    seen in training is dropped (its Pig Latin would be a token the model has no entry for: the
    task tests the transformation of known words in unseen sentences). Characters as tokens
    ("pig-latin-chars"): unseen words are kept (the rule applies to their letters). On the built-in
    data (this CPython's pydoc topics, the defaults): 3669 training units from 930 sentences, 343
    held-out units from 97 sentences; words keep 258 of them (95 sentences, 85 dropped for an
    unseen word), characters keep all 343 (97 sentences), 85 with a word never seen in training.
    """
    scheme = TASKS[task]
    train, held, n = set(), set(), [0, 0]
    for s in prose_sentences():
        side = zlib.crc32(s.encode()) % 1000 < holdout_per_mille
        n[side] += 1
        (held if side else train).update(sentence_units(s, max_bytes, min_bytes))
    held -= train  # a unit that also occurs in a training sentence is not held out
    known = {t for u in train for t in scheme.source(u)}
    vocab = list(SPECIALS) + sorted(known | {t for u in train for t in scheme.target(u)})
    by_len: dict[int, list[str]] = defaultdict(list)
    for u in sorted(train):
        by_len[len(scheme.source(u))].append(u)
    heldout = sorted(
        u for u in held if set(scheme.source(u)) <= known and set(scheme.target(u)) <= set(vocab)
    )
    words = {w for u in train for w in tokens(u)}
    unseen = sum(not set(tokens(u)) <= words for u in heldout)
    return TaskData(dict(by_len), heldout, (n[0], n[1]), vocab, scheme, unseen)


def heldout_clusters(
    data: TaskData, max_bytes: int = 32, min_bytes: int = 12, holdout_per_mille: int = 100
) -> list[int]:
    """Each held-out unit's sentence (an index into the held-out sentences; a unit cut from several
    takes the first): the clusters a bootstrap over sentences resamples
    (`analysis.significance.cluster_bootstrap`). Arguments as `task_data`'s."""
    first: dict[str, int] = {}
    k = 0
    for s in prose_sentences():
        if zlib.crc32(s.encode()) % 1000 < holdout_per_mille:
            for u in sentence_units(s, max_bytes, min_bytes):
                first.setdefault(u, k)
            k += 1
    return [first[u] for u in data.heldout]


def encode_pairs(units: list[str], data: TaskData):
    """(src (B, S), tgt_in (B, T), targets (B, T)) for units of one source length; T = longest target + EOS."""
    return pad_pairs(
        [data.ids(data.scheme.source(u)) for u in units],
        [data.ids(data.scheme.target(u)) + [EOS] for u in units],
    )


def pad_pairs(sources: list[list[int]], tgts: list[list[int]]):
    """(src (B, S), tgt_in (B, T), targets (B, T)) from sources of one length and targets ending in
    EOS: teacher forcing (BOS, then the target shifted), padding after EOS excluded from the loss."""
    import torch

    src = torch.tensor(sources)
    T = max(map(len, tgts))
    tgt_in = torch.full((len(tgts), T), PAD)
    targets = torch.full((len(tgts), T), -100)
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
        from ...data import Batch

        n = self.rng.choices(self.lengths, self.weights)[0]
        units = self.rng.choices(self.data.train[n], k=self.batch)
        src, tgt_in, targets = encode_pairs(units, self.data)
        return Batch((src, tgt_in), targets)


def _by_length(units: list[str], data: TaskData, batch: int):
    """(Batch, its units) for `units` grouped by source length (no source padding), `batch` at most."""
    from ...data import Batch

    by_len: dict[int, list[str]] = defaultdict(list)
    for u in units:
        by_len[len(data.scheme.source(u))].append(u)
    for n in sorted(by_len):
        group = by_len[n]
        for i in range(0, len(group), batch):
            src, tgt_in, targets = encode_pairs(group[i : i + batch], data)
            yield Batch((src, tgt_in), targets), group[i : i + batch]


def heldout_batches(units: list[str], data: TaskData, batch: int) -> list:
    return [b for b, _ in _by_length(units, data, batch)]


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
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def translate(model, units: list[str], data: TaskData, batch: int = 64) -> list[str]:
    """Greedy translations of `units` (in their order), as text (`scheme.text` of the tokens)."""
    hyps = {}
    for b, group in _by_length(units, data, batch):
        src = b.inputs[0]
        for u, row in zip(group, greedy_decode(model, src, data.scheme.max_new(src.shape[1]))):
            hyps[u] = data.scheme.text([data.vocab[t] for t in row])
    return [hyps[u] for u in units]


def references(units: list[str], data: TaskData) -> list[str]:
    """The units' Pig Latin as the text their translations are scored against (`scheme.text`)."""
    return [data.scheme.text(data.scheme.target(u)) for u in units]


def max_len(data: TaskData) -> int:
    """The longest sequence the model meets: a source, or BOS plus the longest decode."""
    n = max(len(data.scheme.source(u)) for u in [*data.heldout, *sum(data.train.values(), [])])
    return max(n, 1 + data.scheme.max_new(n))


def target_ids(units: list[str], data: TaskData) -> list[list[int]]:
    """Each unit's target ids and EOS: the tokens the study's held-out loss is scored on."""
    return [data.ids(data.scheme.target(u)) + [EOS] for u in units]


def _train_targets(data: TaskData) -> list[list[int]]:
    return target_ids([u for n in sorted(data.train) for u in data.train[n]], data)


def unigram_probs(data: TaskData) -> np.ndarray:
    """Add-one frequencies of the training targets' tokens (EOS included) over the dictionary."""
    counts = np.ones(len(data.vocab))
    for t in _train_targets(data):
        np.add.at(counts, t, 1)
    return counts / counts.sum()


def unigram_loss(data: TaskData) -> float:
    """Held-out loss (nats per target token) of the training targets' token frequencies, no context:
    a run that does not beat it learned nothing from the source or the prefix."""
    logp = np.log(unigram_probs(data))
    return float(-np.mean([logp[t] for ts in target_ids(data.heldout, data) for t in ts]))


def bigram_loss(data: TaskData) -> float:
    """Held-out loss (nats per target token, EOS included, every token of every held-out unit
    weighted once: as the study's held-out loss) of a source-blind target bigram model counted on
    the training targets: the bar a run must beat to have used its source at all.

    Smoothing: Witten-Bell interpolation with `unigram_probs`, P(b | a) = (c(a, b) + T(a) P(b)) /
    (c(a) + T(a)), T(a) the number of distinct tokens seen after a (a context never seen: P(b)).
    It has no parameter to tune on the held-out set; add-one over the ~3700-token dictionary
    spreads so much mass on unseen pairs that it scores worse than the unigram (6.48 against
    5.30 nats on the study's task), a bar that says nothing."""
    pair: dict[tuple[int, int], int] = defaultdict(int)
    seen: dict[int, int] = defaultdict(int)
    for t in _train_targets(data):
        for a, b in zip([BOS] + t[:-1], t):
            pair[a, b] += 1
            seen[a] += 1
    follow: dict[int, int] = defaultdict(int)
    for a, _ in pair:
        follow[a] += 1
    uni = unigram_probs(data)
    nll = []
    for t in target_ids(data.heldout, data):
        for a, b in zip([BOS] + t[:-1], t):
            c, k = seen.get(a, 0), follow.get(a, 0)
            p = (pair.get((a, b), 0) + k * uni[b]) / (c + k) if c else uni[b]
            nll.append(-math.log(p))
    return float(np.mean(nll))


# ---- the shuffled-source control ------------------------------------------------------------------

SHUFFLE_SEED = 0  # one permutation for every run and evaluation: runs are scored on the same pairs


def derangement(n: int, seed: int) -> list[int]:
    """A seeded uniformly random permutation of range(n) with no fixed point (rejection sampling:
    about e draws on average)."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 units")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm.tolist()


def unit_pairs(batches) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids up to EOS) of every unit of `batches`, in batch order (sources carry
    no padding; targets end where the loss mask ends)."""
    pairs = []
    for b in batches:
        src, targets = b.inputs[0], b.targets
        for i in range(src.shape[0]):
            pairs.append((src[i].tolist(), targets[i][targets[i] != -100].tolist()))
    return pairs


def shuffled_source_batches(
    batches, seed: int = SHUFFLE_SEED, batch: int = 64
) -> tuple[list, list[int]]:
    """The units of `batches` with sources permuted between units: unit i's target with unit
    perm[i]'s source (`derangement`: none keeps its own), regrouped by source length (the model
    has no source mask) in batches of at most `batch`. Returns (batches, perm).

    The permutation crosses source lengths, so the control takes away the source's length as well
    as its words (a Pig Latin target has as many tokens as its source)."""
    from ...data import Batch

    pairs = unit_pairs(batches)
    perm = derangement(len(pairs), seed)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, j in enumerate(perm):
        by_len[len(pairs[j][0])].append(i)
    out = []
    for n in sorted(by_len):
        group = by_len[n]
        for k in range(0, len(group), batch):
            chunk = group[k : k + batch]
            src, tgt_in, targets = pad_pairs(
                [pairs[perm[i]][0] for i in chunk], [pairs[i][1] for i in chunk]
            )
            out.append(Batch((src, tgt_in), targets))
    return out, perm


def shuffled_source_loss(model, batches, seed: int = SHUFFLE_SEED) -> float:
    """The model's held-out loss (nats per target token, scored as the study's held-out loss) with
    sources permuted between units: what it achieves without its own source. A model that reads
    its source scores well below it; one that ignores the source scores the same."""
    from ...training import score_batches

    return score_batches(model, shuffled_source_batches(batches, seed)[0])[0]
