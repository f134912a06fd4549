"""Hugging Face folders: each family loads offline to the same hidden states; placement detection."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from residual_probe.checkpoints import CheckpointError, load_any
from residual_probe.probe import find_blocks
from residual_probe.probe.structure import detect_placement

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

SMALL = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48
)
FAMILIES = {  # name: (config, model class, expected placement)
    "bert": (lambda: transformers.BertConfig(**SMALL), "BertModel", "post-ln"),
    "roberta": (
        lambda: transformers.RobertaConfig(**SMALL, pad_token_id=1),
        "RobertaForMaskedLM",
        "post-ln",
    ),
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "GPT2LMHeadModel",
        "pre-ln",
    ),
    "gpt_neox": (
        lambda: transformers.GPTNeoXConfig(**SMALL, bos_token_id=0, eos_token_id=0),
        "GPTNeoXForCausalLM",
        "pre-ln",
    ),
    "llama": (
        lambda: transformers.LlamaConfig(
            **SMALL, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0
        ),
        "LlamaForCausalLM",
        "pre-ln",
    ),
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
    ),
    "vit": (
        lambda: transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=16,
            patch_size=8,
        ),
        "ViTModel",
        "pre-ln",
    ),
}


def save_family(name, folder, **save):
    make, cls, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(make()).eval()
    model.save_pretrained(folder, **save)
    return model


def hidden(loaded, model, name):
    gen = torch.Generator().manual_seed(3)
    if name == "vit":
        x = torch.randn(2, 3, 16, 16, generator=gen)
    else:
        x = torch.randint(2, 64, (2, 10), generator=gen)
    with torch.no_grad():
        if name == "vit":
            ref = model(x).last_hidden_state
        elif name == "t5":
            ref = model(x, decoder_input_ids=x, output_hidden_states=True).decoder_hidden_states[-1]
        else:
            ref = model(x, output_hidden_states=True).hidden_states[-1]
        got = loaded.forward(x).last_hidden_state
    return ref, got


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_loads_to_identical_hidden_states_and_placement(tmp_path, name):
    model = save_family(name, tmp_path / name, max_shard_size="20KB" if name == "llama" else "50GB")
    if name == "llama":
        assert (tmp_path / name / "model.safetensors.index.json").is_file()
    loaded = load_any(tmp_path / name)
    assert loaded.family == f"huggingface:{name}"
    ref, got = hidden(loaded, model, name)
    assert torch.allclose(ref, got, atol=1e-6, rtol=0)
    x = torch.randn(1, 3, 16, 16) if name == "vit" else torch.randint(2, 64, (1, 6))
    found = detect_placement(find_blocks(loaded.model), lambda: loaded.forward(x))
    assert found["placement"] == FAMILIES[name][2], found["detail"]


def test_pytorch_bin_and_sharded_bin(tmp_path):
    model = save_family("gpt2", tmp_path / "src")
    state = model.state_dict()
    one = tmp_path / "bin"
    one.mkdir()
    (one / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    torch.save(state, one / "pytorch_model.bin")
    loaded = load_any(one)
    ref, got = hidden(loaded, model, "gpt2")
    assert torch.allclose(ref, got, atol=1e-6, rtol=0)
    # Sharded .bin, then a missing shard.
    keys = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[::2],
        "pytorch_model-00002-of-00002.bin": keys[1::2],
    }
    (one / "pytorch_model.bin").unlink()
    for fname, ks in shards.items():
        torch.save({k: state[k] for k in ks}, one / fname)
    import json

    (one / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}})
    )
    ref, got = hidden(load_any(one), model, "gpt2")
    assert torch.allclose(ref, got, atol=1e-6, rtol=0)
    (one / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(
        CheckpointError, match="shard pytorch_model-00002-of-00002.bin .* is missing"
    ):
        load_any(one)


def test_tokenizer_is_used_when_present(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    save_family("gpt2", tmp_path / "g")
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "residual", "stream", "collapses"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(
        tmp_path / "g"
    )
    loaded = load_any(tmp_path / "g")
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("the residual stream", add_special_tokens=False)["input_ids"] == [
        1,
        2,
        3,
    ]


def test_hf_bad_folders(tmp_path):
    save_family("bert", tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(
        (tmp_path / "b" / "model.safetensors").read_bytes()[:3000]
    )
    with pytest.raises(CheckpointError, match="truncated"):
        load_any(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_any(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="neither"):
        load_any(tmp_path / "c")


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    save_family("bert", tmp_path / "b")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(CheckpointError, match=r"residual-probe\[hf\]"):
        load_any(tmp_path / "b")


def test_a_config_declaring_fewer_layers_than_the_weights_is_an_error(tmp_path):
    """A truncated model (config edited to fewer layers) is refused, naming the omitted blocks;
    --allow-unused-weights accepts it. Missing-weight lists read in layer order (2 before 10)."""
    import json

    from residual_probe.checkpoints.huggingface import natural_key

    save_family("gpt2", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["n_layer"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"blocks the config does not declare \(layers 1-2, 22 weights; config.json declares 1 layer\)",
    ):
        load_any(tmp_path / "m")
    loaded = load_any(tmp_path / "m", allow_unused=True)
    assert len(find_blocks(loaded.model)) == 1 and any("not used" in n for n in loaded.notes)
    assert sorted(["h.100.w", "h.2.w", "h.10.w"], key=natural_key) == ["h.2.w", "h.10.w", "h.100.w"]
