"""The checkpoint data contract: first N tokens, floor(N / L) consecutive windows, rest dropped,
no special tokens, nothing repeated, every change said; fairseq dictionaries."""

from __future__ import annotations

import pytest
import torch

from residual_probe.checkpoints.loaded import LoadedModel
from residual_probe.checkpoints.text import (
    TextError,
    cut_windows,
    read_fairseq_dict,
    text_windows,
    tokenize,
)


def fake(vocab=None, tokenizer=None, special=()):
    return LoadedModel(
        torch.nn.Identity(),
        lambda x: x,
        "test",
        "-",
        vocab_size=vocab,
        tokenizer=tokenizer,
        special_ids=special,
    )


def test_windows_are_consecutive_and_the_tail_is_dropped():
    ids = torch.arange(1000)
    w = cut_windows(ids, 100, 32, "t")
    assert w.ids.shape == (3, 32) and torch.equal(w.ids.flatten(), torch.arange(96))
    assert w.messages == [
        "--tokens 100 rounded down to 96: 3 windows of --seq-len 32, the remaining 4 dropped"
    ]
    w = cut_windows(ids, 10, 32, "t")
    assert w.ids.shape == (1, 32) and "rounded up to 32" in w.messages[0]
    w = cut_windows(torch.arange(70), 320, 32, "t")  # short text: fewer windows, not repeated
    assert (
        w.ids.shape == (2, 32)
        and "only 70 tokens: 2 windows" in w.messages[0]
        and not w.info["repeated"]
    )
    assert cut_windows(ids, 64, 32, "t").messages == []
    with pytest.raises(TextError, match="shorter than one window"):
        cut_windows(torch.arange(20), 64, 32, "t")


def test_known_tokenizer_without_special_tokens():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(["[UNK]", "[CLS]", "[SEP]", "a", "b", "c"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    assert fast("a b")["input_ids"] == [1, 3, 4, 2]  # the tokenizer would add specials by default
    w = text_windows(fake(6, fast), "a b c " * 10, tokens=7, seq_len=3)
    assert w.ids.tolist() == [[3, 4, 5], [3, 4, 5]] and "tokenizer" in w.tokenization


def test_bytes_and_fairseq_dictionary(tmp_path):
    ids, how = tokenize(fake(256), "AB", 2)
    assert ids.tolist() == [65, 66] and how.startswith("UTF-8 bytes")
    ids, how = tokenize(fake(300, special=(0, 1, 2, 3)), "AB", 2)
    assert ids.tolist() == [69, 70] and "--dict" in how
    (tmp_path / "dict.txt").write_text("the 10\ncat 5\nsat 3\n<unk> 1 #fairseq:overwrite\n")
    table = read_fairseq_dict(tmp_path / "dict.txt")
    assert table["the"] == 4 and table["sat"] == 6 and table["<unk>"] == 3 and len(table) == 7
    ids, how = tokenize(fake(8, special=(0, 1, 2, 3)), "the cat\nsat dog\n", 10, table)
    assert ids.tolist() == [4, 5, 2, 6, 3, 2] and "25.0% <unk>" in how
    (tmp_path / "bad.txt").write_text("nocount\n")
    with pytest.raises(TextError, match="line 1"):
        read_fairseq_dict(tmp_path / "bad.txt")
    with pytest.raises(TextError, match="more than the model's vocabulary"):
        tokenize(fake(5, special=(0, 1, 2, 3)), "the", 1, table)
