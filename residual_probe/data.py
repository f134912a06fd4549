"""Batches for the built-in tasks: synthetic by default, or byte-level tokens of a UTF-8 text file.

Token 0 is reserved (decoder start for seq2seq, mask for the encoder); every other id is a
byte value, so any UTF-8 text is in vocabulary with `vocab_size` 256.

Tasks by architecture:
- decoder: next-token prediction.
- encoder: masked-token prediction (15 % of positions replaced by token 0).
- seq2seq: reverse the source (copy in reverse order), teacher-forced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

RESERVED = 0  # decoder start / mask token
MASK_RATE = 0.15


class DataError(UserError):
    """Unusable input data; the message is one line meant for the user."""


@dataclass
class Batch:
    inputs: tuple[torch.Tensor, ...]  # model(*inputs) -> logits (B, T, vocab)
    targets: torch.Tensor  # (B, T), -100 where there is no target

    @property
    def tokens(self) -> int:
        return int((self.targets != -100).sum())


def read_text_tokens(path: str | Path) -> torch.Tensor:
    """A UTF-8 text file as byte tokens (1-D long tensor); NUL bytes map to the reserved id anyway."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {str(p)!r}: {exc.strerror or exc}") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {str(p)!r} is not UTF-8 text (byte {exc.start})") from None
    if len(raw) < 2:
        raise DataError(f"data file {str(p)!r} is empty")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


class BatchSource:
    """Seeded batches for one architecture, drawn from random tokens or from a token stream."""

    def __init__(
        self,
        arch: str,
        batch: int,
        seq_len: int,
        vocab: int,
        seed: int,
        text: torch.Tensor | None = None,
    ):
        if batch < 1 or seq_len < 2:
            raise DataError(f"batch must be >= 1 and seq-len >= 2, got {batch} and {seq_len}")
        if text is not None and text.numel() < seq_len + 2:
            raise DataError(
                f"data has {text.numel()} tokens, fewer than seq-len + 2 = {seq_len + 2}"
            )
        if text is not None and int(text.max()) >= vocab:
            raise DataError(f"data holds token {int(text.max())}, outside a vocabulary of {vocab}")
        self.arch, self.batch, self.seq_len, self.vocab, self.text = (
            arch,
            batch,
            seq_len,
            vocab,
            text,
        )
        self.gen = torch.Generator().manual_seed(seed)

    def _sequences(self, length: int) -> torch.Tensor:  # (B, length)
        if self.text is None:
            return torch.randint(1, self.vocab, (self.batch, length), generator=self.gen)
        starts = torch.randint(0, self.text.numel() - length + 1, (self.batch,), generator=self.gen)
        return torch.stack([self.text[s : s + length] for s in starts.tolist()])

    def next(self) -> Batch:
        T = self.seq_len
        if self.arch == "decoder":
            seq = self._sequences(T + 1)
            return Batch((seq[:, :-1],), seq[:, 1:])
        if self.arch == "encoder":
            seq = self._sequences(T)
            masked = torch.rand(seq.shape, generator=self.gen) < MASK_RATE
            masked[:, 0] |= ~masked.any(dim=1)  # at least one target per row
            return Batch((seq.masked_fill(masked, RESERVED),), seq.masked_fill(~masked, -100))
        src = self._sequences(T)
        tgt = src.flip(1)
        start = torch.full((self.batch, 1), RESERVED, dtype=torch.long)
        return Batch((src, torch.cat([start, tgt[:, :-1]], dim=1)), tgt)


def builtin_corpus() -> torch.Tensor:
    """Byte tokens of CPython's own documentation topics (`pydoc_data.topics`, ~466 KB of English).

    Every CPython install ships it, so training on real text needs no download and no file.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def split_tokens(tokens: torch.Tensor, holdout: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation): the last `holdout` fraction is held out, contiguous, so no text leaks."""
    cut = int(tokens.numel() * (1 - holdout))
    return tokens[:cut], tokens[cut:]
