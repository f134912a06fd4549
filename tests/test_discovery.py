"""Block discovery: the right blocks, sublayers and norms in each model family, and clear failures.

Hugging Face models are tiny random-weight models built from their config classes (offline).
"""

import pytest
import torch
from torch import nn

from residual_probe.models import build_model
from residual_probe.probe import DiscoveryError, find_blocks

SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)


def summary(blocks):
    """[(stack, index, name)] for compact comparison."""
    return [(b.stack, b.index, b.name) for b in blocks]


def test_own_models_all_archs():
    blocks = find_blocks(
        build_model(
            arch="seq2seq",
            placement="residual",
            depth=2,
            decoder_depth=3,
            d_model=16,
            heads=2,
            ffn=16,
        )
    )
    assert summary(blocks) == [
        ("encoder", 0, "encoder.layers.0"),
        ("encoder", 1, "encoder.layers.1"),
        ("decoder", 0, "decoder.layers.0"),
        ("decoder", 1, "decoder.layers.1"),
        ("decoder", 2, "decoder.layers.2"),
    ]
    assert blocks[0].sublayer_names == ["self_attn", "ffn"]
    assert blocks[2].sublayer_names == ["self_attn", "cross_attn", "ffn"]
    assert list(blocks[2].norms) == ["self_attn.norm", "cross_attn.norm", "ffn.norm"]
    assert all(b.streams == ("x", "d") for b in blocks)
    sandwich = find_blocks(
        build_model(arch="decoder", placement="sandwich", depth=1, d_model=16, heads=2, ffn=16)
    )
    assert list(sandwich[0].norms) == [
        "self_attn.norm",
        "self_attn.out_norm",
        "ffn.norm",
        "ffn.out_norm",
    ]
    assert sandwich[0].streams == ("x",)
    rezero = find_blocks(
        build_model(arch="encoder", placement="rezero", depth=2, d_model=16, heads=2, ffn=16)
    )
    assert summary(rezero) == [
        ("encoder", 0, "encoder.layers.0"),
        ("encoder", 1, "encoder.layers.1"),
    ]
    assert rezero[0].norms == {}


def test_torch_transformer_encoder_and_decoder():
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
        num_layers=3,
        enable_nested_tensor=False,
    )
    blocks = find_blocks(enc)
    assert summary(blocks) == [("encoder", k, f"layers.{k}") for k in range(3)]
    assert blocks[0].sublayer_names == ["self_attn", "linear1", "linear2"]
    assert list(blocks[0].norms) == ["norm1", "norm2"]
    dec = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(16, 2, 32, batch_first=True), num_layers=2
    )
    blocks = find_blocks(dec)
    assert summary(blocks) == [("decoder", 0, "layers.0"), ("decoder", 1, "layers.1")]
    assert blocks[0].sublayer_names == ["self_attn", "multihead_attn", "linear1", "linear2"]
    full = nn.Transformer(16, 2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=32)
    assert summary(find_blocks(full)) == [
        ("encoder", 0, "encoder.layers.0"),
        ("encoder", 1, "encoder.layers.1"),
        ("decoder", 0, "decoder.layers.0"),
    ]


class FairseqLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, 2)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.final_layer_norm = nn.LayerNorm(d)


class FairseqStack(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, d)
        self.layers = nn.ModuleList(FairseqLayer(d) for _ in range(n))


class FairseqModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = FairseqStack(2, 8), FairseqStack(3, 8)


def test_fairseq_style_encoder_decoder_layers():
    blocks = find_blocks(FairseqModel())
    assert [(b.stack, b.name) for b in blocks] == [
        ("encoder", "encoder.layers.0"),
        ("encoder", "encoder.layers.1"),
        ("decoder", "decoder.layers.0"),
        ("decoder", "decoder.layers.1"),
        ("decoder", "decoder.layers.2"),
    ]
    assert blocks[0].sublayer_names == ["self_attn", "fc1", "fc2"]
    assert list(blocks[0].norms) == ["self_attn_layer_norm", "final_layer_norm"]


class Odd(nn.Module):
    """A model whose blocks no rule recognizes: a dict of differently named units."""

    def __init__(self):
        super().__init__()
        self.units = nn.ModuleDict(
            {f"u{k}": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for k in range(3)}
        )
        self.head = nn.Linear(4, 2)


def test_user_pattern_names_the_blocks():
    with pytest.raises(DiscoveryError, match="no residual blocks found in Odd"):
        find_blocks(Odd())
    blocks = find_blocks(Odd(), "units.*")
    assert summary(blocks) == [
        ("units", 0, "units.u0"),
        ("units", 1, "units.u1"),
        ("units", 2, "units.u2"),
    ]
    assert blocks[0].sublayer_names == ["0", "1"]
    # a pattern overrides discovery, and nested matches keep only the outermost
    model = build_model(arch="decoder", depth=2, d_model=16, heads=2, ffn=16)
    assert [b.name for b in find_blocks(model, "decoder.layers.*")] == [
        "decoder.layers.0",
        "decoder.layers.1",
    ]
    assert [b.name for b in find_blocks(model, "*.layers.*.ffn")] == [
        "decoder.layers.0.ffn",
        "decoder.layers.1.ffn",
    ]


def test_bad_patterns():
    with pytest.raises(
        DiscoveryError,
        match=r"pattern 'model\.layers\.\*' matched no module of Odd; module paths look like: units",
    ):
        find_blocks(Odd(), "model.layers.*")
    with pytest.raises(DiscoveryError, match="non-empty"):
        find_blocks(Odd(), " ")


def test_a_list_of_plain_linears_is_not_a_stack():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    with pytest.raises(DiscoveryError):
        find_blocks(model)


# ---- Hugging Face families (offline, random weights) ---------------------------------------


def hf():
    return pytest.importorskip("transformers")


def build_hf(name):
    T = hf()
    torch.manual_seed(0)
    if name == "gpt2":
        return T.GPT2LMHeadModel(
            T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
        )
    if name == "bert":
        return T.BertForMaskedLM(
            T.BertConfig(num_hidden_layers=2, vocab_size=50, max_position_embeddings=16, **SMALL)
        )
    if name == "roberta":
        return T.RobertaForMaskedLM(
            T.RobertaConfig(num_hidden_layers=2, vocab_size=50, max_position_embeddings=20, **SMALL)
        )
    if name == "gpt_neox":
        return T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(num_hidden_layers=2, vocab_size=50, max_position_embeddings=16, **SMALL)
        )
    if name in ("llama", "mistral", "qwen2"):
        cfg_cls, model_cls = {
            "llama": (T.LlamaConfig, T.LlamaForCausalLM),
            "mistral": (T.MistralConfig, T.MistralForCausalLM),
            "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        }[name]
        return model_cls(
            cfg_cls(
                num_hidden_layers=2,
                num_key_value_heads=1,
                vocab_size=50,
                max_position_embeddings=16,
                **SMALL,
            )
        )
    if name == "t5":
        return T.T5ForConditionalGeneration(
            T.T5Config(
                num_layers=2,
                num_decoder_layers=3,
                d_model=32,
                num_heads=2,
                d_kv=16,
                d_ff=64,
                vocab_size=50,
            )
        )
    if name == "vit":
        return T.ViTModel(T.ViTConfig(num_hidden_layers=2, image_size=16, patch_size=8, **SMALL))
    raise KeyError(name)


HF_EXPECTED = {
    # family: (block paths, stack names, sublayers of block 0, norms of block 0)
    "gpt2": (
        ["transformer.h.0", "transformer.h.1"],
        ["transformer.h"] * 2,
        ["attn", "mlp"],
        ["ln_1", "ln_2"],
    ),
    "bert": (
        ["bert.encoder.layer.0", "bert.encoder.layer.1"],
        ["encoder"] * 2,
        ["attention", "intermediate", "output"],
        ["attention.output.LayerNorm", "output.LayerNorm"],
    ),
    "roberta": (
        ["roberta.encoder.layer.0", "roberta.encoder.layer.1"],
        ["encoder"] * 2,
        ["attention", "intermediate", "output"],
        ["attention.output.LayerNorm", "output.LayerNorm"],
    ),
    "gpt_neox": (
        ["gpt_neox.layers.0", "gpt_neox.layers.1"],
        ["gpt_neox.layers"] * 2,
        ["attention", "mlp"],
        ["input_layernorm", "post_attention_layernorm"],
    ),
    "llama": (
        ["model.layers.0", "model.layers.1"],
        ["decoder"] * 2,
        ["self_attn", "mlp"],
        ["input_layernorm", "post_attention_layernorm"],
    ),
    "mistral": (
        ["model.layers.0", "model.layers.1"],
        ["decoder"] * 2,
        ["self_attn", "mlp"],
        ["input_layernorm", "post_attention_layernorm"],
    ),
    "qwen2": (
        ["model.layers.0", "model.layers.1"],
        ["decoder"] * 2,
        ["self_attn", "mlp"],
        ["input_layernorm", "post_attention_layernorm"],
    ),
    "t5": (
        [
            "encoder.block.0",
            "encoder.block.1",
            "decoder.block.0",
            "decoder.block.1",
            "decoder.block.2",
        ],
        ["encoder"] * 2 + ["decoder"] * 3,
        ["layer.0", "layer.1"],
        ["layer.0.layer_norm", "layer.1.layer_norm"],
    ),
}


@pytest.mark.parametrize("family", list(HF_EXPECTED))
def test_hugging_face_families(family):
    names, stacks, subs, norms = HF_EXPECTED[family]
    blocks = find_blocks(build_hf(family))
    assert [b.name for b in blocks] == names
    assert [b.stack for b in blocks] == stacks
    assert blocks[0].sublayer_names == subs
    assert list(blocks[0].norms) == norms
    assert all(b.streams == ("x",) for b in blocks)
    if family == "t5":
        assert blocks[2].sublayer_names == ["layer.0", "layer.1", "layer.2"]  # self, cross, FFN


def test_vit():
    blocks = find_blocks(build_hf("vit"))
    assert [(b.stack, b.index) for b in blocks] == [
        ("layers", 0),
        ("layers", 1),
    ]  # ViTModel: layers.N
    assert "attention" in blocks[0].sublayer_names
    assert len(blocks[0].norms) == 2  # layernorm_before, layernorm_after


def test_wrapped_in_ddp_style_module_prefix():
    wrapper = nn.Module()
    wrapper.module = build_hf("llama")
    # the role comes from the block class (LlamaDecoderLayer) when the path names none
    assert [(b.stack, b.name) for b in find_blocks(wrapper)] == [
        ("decoder", "module.model.layers.0"),
        ("decoder", "module.model.layers.1"),
    ]
