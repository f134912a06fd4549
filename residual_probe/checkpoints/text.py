"""The data contract of the checkpoint jobs (`collapse`, `grad-norms --ckpt`, `diagnose`).

The first N tokens of the text, as the checkpoint's own tokenizer encodes it without special
tokens, cut into floor(N / L) consecutive, non-overlapping windows of L tokens; the rest is
dropped, nothing is repeated. Tokenizers, in order:
- a Hugging Face tokenizer saved in the folder;
- a fairseq dictionary (`--dict dict.txt`): fairseq's `encode_line`, i.e. words split on
  whitespace, looked up in the dictionary (<unk> where absent), `</s>` after every line; the
  text must already be preprocessed (BPE) the way the model's training data was;
- otherwise UTF-8 bytes (our byte-level models), folded into the vocabulary's id range when it
  is smaller than 256 or, for fairseq, shifted past its four special symbols.
Every rounding of N and every shortfall of the text is said in `Windows.messages`, which the
commands print.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3 of every fairseq Dictionary


class TextError(CheckpointError):
    """Unusable text for a checkpoint (too short, wrong dictionary); one line for the user."""


@dataclass
class Windows:
    ids: torch.Tensor  # (n_windows, seq_len) token ids
    tokenization: str
    messages: list[str] = field(default_factory=list)  # printed on the console by the commands
    info: dict = field(default_factory=dict)  # for the JSON sidecar


def read_text(path: str | None) -> tuple[str, str]:
    """(text, description): a UTF-8 file, or the built-in corpus that every CPython ships."""
    from ..data import DataError, builtin_corpus, read_text_tokens

    if path is None:
        return bytes(builtin_corpus().to("cpu").byte().numpy()).decode(
            "utf-8"
        ), "built-in: CPython pydoc topics"
    raw = bytes(read_text_tokens(path).byte().numpy())
    if not raw.strip():
        raise DataError(f"data file {path!r} holds only whitespace")
    return raw.decode("utf-8"), str(path)


def read_fairseq_dict(path: str | Path) -> dict[str, int]:
    """symbol -> id of a fairseq `dict.txt` ("<symbol> <count>" per line, optional "#fairseq:overwrite");
    ids follow fairseq's Dictionary: the four specials first, then the file's symbols in order."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TextError(f"cannot read dictionary {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TextError(f"dictionary {p} is not UTF-8 text") from None
    table = {s: i for i, s in enumerate(FAIRSEQ_SPECIALS)}
    for n, line in enumerate(lines, 1):
        line = line.rstrip()
        if not line:
            continue
        overwrite = line.endswith(" #fairseq:overwrite")
        if overwrite:
            line = line[: -len(" #fairseq:overwrite")]
        symbol, _, count = line.rpartition(" ")
        if not symbol or not count.lstrip("-").isdigit():
            raise TextError(
                f"{p} line {n}: expected '<symbol> <count>' as in fairseq's dict.txt, got {line[:60]!r}"
            )
        if symbol in table and not overwrite:
            raise TextError(
                f"{p} line {n}: duplicate symbol {symbol!r} (fairseq needs '#fairseq:overwrite')"
            )
        table.setdefault(symbol, len(table))
    if len(table) == len(FAIRSEQ_SPECIALS):
        raise TextError(f"dictionary {p} holds no symbols")
    return table


def tokenize(
    loaded, text: str, need: int, dictionary: dict[str, int] | None = None
) -> tuple[torch.Tensor, str]:
    """1-D ids of (at least `need` tokens of) `text` for this model, and how they were made."""
    text = text[: max(need * 16, 4096)]  # enough characters for `need` tokens in any tokenizer
    vocab = loaded.vocab_size
    if dictionary is not None:
        if vocab is not None and len(dictionary) > vocab:
            raise TextError(
                f"the dictionary has {len(dictionary)} symbols, more than the model's vocabulary of {vocab}"
            )
        unk, eos = dictionary["<unk>"], dictionary["</s>"]
        ids, unknown, n_words = [], 0, 0
        for line in text.splitlines():
            words = line.split()
            if not words:
                continue
            n_words += len(words)
            for w in words:
                i = dictionary.get(w, unk)
                unknown += i == unk
                ids.append(i)
            ids.append(eos)
            if len(ids) >= need:
                break
        words = max(1, n_words)
        return (
            torch.tensor(ids, dtype=torch.long),
            f"fairseq dictionary ({len(dictionary)} symbols): whitespace-split words, </s> after each line, "
            f"{100 * unknown / words:.1f}% <unk>",
        )
    if loaded.tokenizer is not None:
        ids = loaded.tokenizer(text, add_special_tokens=False, return_attention_mask=False)[
            "input_ids"
        ]
        name = type(loaded.tokenizer).__name__
        return torch.tensor(
            ids, dtype=torch.long
        ), f"the checkpoint's tokenizer ({name}), no special tokens"
    raw = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    vocab = vocab or 256
    low = len(loaded.special_ids)
    if vocab >= 256 + low and low == 0:
        return raw, "UTF-8 bytes (byte-level model)"
    if vocab - low < 2:
        raise TextError(f"vocabulary of {vocab} is too small for byte-level input")
    if low + 256 <= vocab:
        return (
            raw + low,
            f"UTF-8 bytes shifted past the {low} special ids (no dictionary given: --dict)",
        )
    return low + raw % (vocab - low), (
        f"UTF-8 bytes folded into ids {low}..{vocab - 1}"
        + (" (no dictionary given: --dict)" if low else "")
    )


def cut_windows(
    ids: torch.Tensor, tokens: int, seq_len: int, how: str, whole_text: bool = True
) -> Windows:
    """floor(tokens / seq_len) consecutive windows of `ids` (at least one), every change said.

    whole_text: `ids` tokenize the whole text (False: tokenization stopped once enough tokens were
    read, so the text's token count is unknown: `text_tokens` is None, `tokens_read` says how many)."""
    if seq_len < 2:
        raise TextError(f"--seq-len must be >= 2, got {seq_len}")
    if tokens < 1:
        raise TextError(f"--tokens must be >= 1, got {tokens}")
    messages = []
    wanted = tokens // seq_len
    if wanted == 0:
        wanted = 1
        messages.append(
            f"--tokens {tokens} rounded up to {seq_len}: one window of --seq-len {seq_len}"
        )
    elif wanted * seq_len != tokens:
        messages.append(
            f"--tokens {tokens} rounded down to {wanted * seq_len}: {wanted} windows of --seq-len "
            f"{seq_len}, the remaining {tokens - wanted * seq_len} dropped"
        )
    have = ids.numel() // seq_len
    if have == 0:
        raise TextError(
            f"the text gives {ids.numel()} tokens, shorter than one window of --seq-len {seq_len}"
        )
    if have < wanted:
        messages.append(
            f"the text gives only {ids.numel()} tokens: {have} windows ({have * seq_len} tokens) "
            f"instead of {wanted}; nothing is repeated"
        )
    n = min(have, wanted)
    windows = ids[: n * seq_len].view(n, seq_len)
    info = {
        "tokenization": how,
        "tokens_requested": tokens,
        "tokens": n * seq_len,
        "windows": n,
        "seq_len": seq_len,
        "text_tokens": int(ids.numel()) if whole_text else None,
        "tokens_read": int(ids.numel()),
        "repeated": False,
    }
    return Windows(windows, how, messages, info)


def text_windows(
    loaded, text: str, tokens: int, seq_len: int, dictionary: dict[str, int] | None = None
) -> Windows:
    """The contract end to end for one loaded model."""
    if loaded.max_len is not None and seq_len > loaded.max_len:
        raise TextError(f"--seq-len {seq_len} exceeds the model's {loaded.max_len} positions")
    need = max(1, math.ceil(tokens / seq_len)) * seq_len
    ids, how = tokenize(loaded, text, need, dictionary)
    if loaded.vocab_size is not None and ids.numel() and int(ids.max()) >= loaded.vocab_size:
        raise TextError(
            f"the tokenizer gives id {int(ids.max())}, outside the model's vocabulary of {loaded.vocab_size}"
        )
    stopped = dictionary is not None and loaded.family.startswith("fairseq") and ids.numel() >= need
    return cut_windows(
        ids, tokens, seq_len, how, whole_text=not stopped
    )  # fairseq's reader stops at `need`
