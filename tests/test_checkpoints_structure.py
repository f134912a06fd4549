"""Placement detection from block structure (probe/structure.py): our ten placements and random-weight
Hugging Face configs of GPT-2, Llama, BERT, T5, BART, Gemma 2 and OLMo 2 (offline, tiny)."""

from __future__ import annotations

import os

import pytest
import torch

from residual_probe.models import PLACEMENTS, ModelConfig, build_model
from residual_probe.probe import find_blocks
from residual_probe.probe.structure import classify, detect_placement

OURS = {
    "post-ln": "post-ln",
    "deepnorm": "post-ln",
    "b2t": "post-ln",
    "pre-ln": "pre-ln",
    "sandwich": "sandwich",
    "peri-ln": "peri-ln",
    "lns": "pre-ln",
    "residual": "residual",
    "mix-ln": "mix-ln",
    "rezero": "no-norm",
    "dyt": "dyt",
    # no pre-norm on attention (its q, k, v norms are attention internals), a norm between
    # attention and FFN: no label names it yet (issue 33: a `hybridnorm` label)
    "hybridnorm": "other",
    # n residual copies (h0..h3): until the detector has its hyper-connection rule (issue 33:
    # `hyper-connections (n=4)` / `mhc`) HC's identity mixing reads as Pre-LN per copy, mHC's
    # Sinkhorn mixing as other
    "hc": "pre-ln",
    "mhc": "other",
}


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_our_placements(placement, norm):
    assert set(OURS) == set(PLACEMENTS)
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            arch="seq2seq",
            placement=placement,
            depth=4,
            d_model=16,
            heads=4,
            ffn=24,
            max_len=64,
            mix_ratio=0.5,
            norm="layernorm" if PLACEMENTS[placement].norm else norm,
        )
    ).eval()
    with torch.no_grad():  # trained-looking norm weights and ReZero gates
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("gate"):
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(1, 256, (1, 8))
    found = detect_placement(find_blocks(model), lambda: model(ids, ids), model)
    assert found["placement"] == OURS[placement], found["detail"]
    expected = "none" if placement == "rezero" else PLACEMENTS[placement].norm or norm
    assert found["norm_type"] == expected
    if placement == "mix-ln":
        assert found["per_block"]["encoder"] == ["post-ln", "post-ln", "pre-ln", "pre-ln"]


def test_classify_on_hand_made_tensors():
    x, f = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ln = torch.nn.functional.layer_norm
    n = lambda t: ln(t, (8,))  # noqa: E731
    assert classify((x,), (n(x + f),), [(x + f, n(x + f))]) == "post-ln"
    assert classify((x,), (x + f,), [(x, n(x))]) == "pre-ln"
    assert classify((x,), (x + n(f),), [(x, n(x)), (f, n(f))]) == "sandwich"
    assert classify((x,), (x + n(f),), [(f, n(f))]) == "res-post-ln"
    assert classify((x,), (x + f,), []) == "no-norm"
    assert classify((x,), (x + f,), [(f, n(f))]) == "other"


transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"
SMALL = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
)
HF = {  # name: (config, class, placement, norm type)
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64
        ),
        "GPT2LMHeadModel",
        "pre-ln",
        "layernorm",
    ),
    "llama": (
        lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2),
        "LlamaForCausalLM",
        "pre-ln",
        "rmsnorm",
    ),
    "bert": (lambda: transformers.BertConfig(**SMALL), "BertForMaskedLM", "post-ln", "layernorm"),
    "t5": (
        lambda: transformers.T5Config(
            vocab_size=64,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
        "T5ForConditionalGeneration",
        "pre-ln",
        "rmsnorm",
    ),
    "bart": (
        lambda: transformers.BartConfig(
            vocab_size=64,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
        ),
        "BartForConditionalGeneration",
        "post-ln",
        "layernorm",
    ),
    "gemma2": (
        lambda: transformers.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8),
        "Gemma2ForCausalLM",
        "sandwich",
        "rmsnorm",
    ),
    "olmo2": (
        lambda: transformers.Olmo2Config(**SMALL, num_key_value_heads=2),
        "Olmo2ForCausalLM",
        "res-post-ln",
        "rmsnorm",
    ),
}


@pytest.mark.parametrize("name", list(HF))
def test_hugging_face_families(name):
    make, cls, placement, ntype = HF[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(make()).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname.lower():
                p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(3, 64, (1, 8))
    if model.config.is_encoder_decoder:
        run = lambda: model(input_ids=ids, decoder_input_ids=ids)  # noqa: E731
    else:
        run = lambda: model(input_ids=ids)  # noqa: E731
    found = detect_placement(find_blocks(model), run, model)
    assert found["placement"] == placement, found["detail"]
    assert found["norm_type"] == ntype
    assert found["qk_norm"] == (name == "olmo2")


class Squash(torch.nn.Module):
    """A user's own DyT under a name the detector has never seen (the paper's is DynamicTanh)."""

    def __init__(self, d):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.full((1,), 0.5))
        self.gamma = torch.nn.Parameter(1 + 0.3 * torch.randn(d))
        self.beta = torch.nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return self.gamma * torch.tanh(self.alpha * x) + self.beta


def test_dyt_is_recognised_by_behaviour_in_a_users_model():
    """nn.TransformerEncoder, Pre-LN (norm_first), every LayerNorm swapped for a DyT of any name:
    read as dyt with norm type dyt (was no-norm, norm type none); a LayerScale-like per-channel
    scale is not a norm."""
    from residual_probe.probe.discovery import is_norm, squashes

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=True)
    model = torch.nn.TransformerEncoder(layer, 3, norm=torch.nn.LayerNorm(16))
    for blk in model.layers:
        blk.norm1, blk.norm2 = Squash(16), Squash(16)
    model.norm = Squash(16)
    model.eval()
    x = torch.randn(5, 2, 16)
    found = detect_placement(find_blocks(model), lambda: model(x), model)
    assert (found["placement"], found["norm_type"]) == ("dyt", "dyt"), found["detail"]
    assert squashes(model.norm) and is_norm(model.norm)

    class LayerScale(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.gamma, self.alpha = (
                torch.nn.Parameter(torch.ones(d)),
                torch.nn.Parameter(torch.ones(1)),
            )

        def forward(self, x):
            return self.alpha * self.gamma * x

    assert not squashes(LayerScale(16)) and not squashes(torch.nn.Linear(16, 16))
