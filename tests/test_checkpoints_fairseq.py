"""fairseq checkpoints in the real layout, made from our own models, load back to identical outputs."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import tiny_model

from residual_probe.checkpoints import CheckpointError
from residual_probe.checkpoints.fairseq import fairseq_state, load_fairseq_file
from residual_probe.models import ModelConfig, build_model

ARCH_NAME = {"post-ln": "transformer", "pre-ln": "transformer", "residual": "resi_dual"}


class AverageMeter:  # a non-tensor object in extra_state, as fairseq's meters are
    def __init__(self):
        self.val, self.sum, self.count = 3.0, 30.0, 10


def make_model(placement, arch="seq2seq", tie=True):
    sizes = dict(depth=3, heads=4, ffn=24, vocab_size=40, max_len=64, position_offset=2)
    model = tiny_model(placement, arch, tie_embeddings=tie, **sizes).eval()
    with torch.no_grad():  # trained-looking norms, so a swapped LN would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def hydra_cfg(model):
    """cfg as fairseq >= 0.10 saves it: a plain dict, the model options nested per stack."""
    c = model.cfg
    stack = {
        "embed_dim": c.d_model,
        "ffn_embed_dim": c.ffn,
        "layers": c.depth,
        "attention_heads": c.heads,
        "normalize_before": c.placement != "post-ln",
        "learned_pos": False,
    }
    m = {
        "_name": ARCH_NAME[c.placement],
        "dropout": 0.3,
        "activation_fn": "relu",
        "encoder": dict(stack),
        "decoder": dict(stack),
        "share_decoder_input_output_embed": c.tie_embeddings,
        "max_source_positions": c.max_len,
        "max_target_positions": c.max_len,
    }
    if c.placement == "residual":
        m.update(
            enc_alpha=1.0, dec_alpha=1.0, enc_res_input_norm_scale=1.0, dec_res_input_norm_scale=1.0
        )
    return {"_name": None, "common": {"seed": 1}, "model": m, "task": {"_name": "translation"}}


def legacy_args(model):
    """args as older fairseq saves them: one flat argparse Namespace."""
    c = model.cfg
    flat = {
        "arch": ARCH_NAME[c.placement],
        "activation_fn": "relu",
        "max_source_positions": c.max_len,
        "max_target_positions": c.max_len,
    }
    for s in ("encoder", "decoder"):
        flat.update(
            {
                f"{s}_embed_dim": c.d_model,
                f"{s}_ffn_embed_dim": c.ffn,
                f"{s}_layers": c.depth,
                f"{s}_attention_heads": c.heads,
                f"{s}_normalize_before": c.placement == "pre-ln",
            }
        )
    return argparse.Namespace(**flat)


def save_fairseq(model, path, legacy=False):
    state = fairseq_state(model)
    ckpt = {
        "model": state,
        "cfg": None if legacy else hydra_cfg(model),
        "args": legacy_args(model) if legacy else None,
        "optimizer_history": [
            {
                "criterion_name": "LabelSmoothedCrossEntropyCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": 3.2},
                "num_updates": 1200,
            }
        ],
        "extra_state": {
            "epoch": 4,
            "train_iterator": {"epoch": 4, "iterations_in_epoch": 10},
            "metrics": {"train": [(0, "loss", AverageMeter())]},
            "previous_training_time": 12.5,
        },
        "last_optimizer_state": {
            "state": {0: {"exp_avg": torch.zeros(3)}},
            "param_groups": [{"lr": 1e-3}],
        },
    }
    torch.save(ckpt, path)
    return state


def run(model, arch):
    src = torch.randint(4, 40, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(src, src.flip(1)) if arch == "seq2seq" else model(src)


@pytest.mark.parametrize("placement", ["post-ln", "pre-ln", "residual"])
@pytest.mark.parametrize("legacy", [False, True])
def test_fairseq_round_trip_is_exact(tmp_path, placement, legacy):
    model = make_model(placement)
    state = save_fairseq(model, tmp_path / "checkpoint_best.pt", legacy=legacy)
    # The layout really is fairseq's.
    for key in (
        "encoder.layers.0.self_attn_layer_norm.weight",
        "decoder.layers.2.encoder_attn.k_proj.bias",
        "decoder.layers.1.encoder_attn_layer_norm.bias",
        "encoder.layers.2.fc1.weight",
        "decoder.layers.0.final_layer_norm.weight",
        "decoder.output_projection.weight",
        "encoder.embed_tokens.weight",
        "decoder.embed_positions._float_tensor",
    ):
        assert key in state
    assert ("encoder.layer_norm.weight" in state) == (placement != "post-ln")
    loaded, info = load_fairseq_file(tmp_path / "checkpoint_best.pt")
    assert loaded.cfg.placement == placement and loaded.cfg.depth == 3 and loaded.cfg.heads == 4
    assert info["fairseq_arch"] == ARCH_NAME[placement]
    assert torch.equal(run(model, "seq2seq"), run(loaded, "seq2seq"))


@pytest.mark.parametrize("tie", [True, False])
def test_fairseq_decoder_only_lm(tmp_path, tie):
    model = make_model("pre-ln", arch="decoder", tie=tie)
    save_fairseq(model, tmp_path / "lm.pt")
    loaded, _ = load_fairseq_file(tmp_path / "lm.pt")
    assert loaded.cfg.arch == "decoder" and loaded.cfg.tie_embeddings == tie
    assert torch.equal(run(model, "decoder"), run(loaded, "decoder"))


def test_positions_follow_fairseq_padding_offset():
    # fairseq's first real token sits at position padding_idx + 1 = 2 of the sinusoidal table.
    model = make_model("pre-ln")
    d = model.cfg.d_model
    half = d // 2
    freq = torch.exp(
        torch.arange(half, dtype=torch.float64)
        * -(torch.log(torch.tensor(10000.0, dtype=torch.float64)) / (half - 1))
    )
    expected = torch.cat([(2 * freq).sin(), (2 * freq).cos()]).float()
    assert torch.allclose(model.encoder.embed.positions[0], expected, atol=1e-6)


def test_fairseq_unsupported_and_inconsistent(tmp_path):
    model = make_model("post-ln")
    state = fairseq_state(model)
    cfg = hydra_cfg(model)
    cfg["model"]["activation_fn"] = "gelu"
    torch.save({"model": state, "cfg": cfg}, tmp_path / "gelu.pt")
    with pytest.raises(CheckpointError, match="activation_fn"):
        load_fairseq_file(tmp_path / "gelu.pt")
    cfg = hydra_cfg(model)
    cfg["model"]["encoder"]["normalize_before"] = cfg["model"]["decoder"]["normalize_before"] = True
    torch.save({"model": state, "cfg": cfg}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="final layer_norm"):
        load_fairseq_file(tmp_path / "wrong.pt")
    extra = dict(state, **{"encoder.layernorm_embedding.weight": torch.ones(16)})
    torch.save({"model": extra, "cfg": hydra_cfg(model)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="layernorm_embedding"):
        load_fairseq_file(tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="no fairseq counterpart"):
        fairseq_state(
            build_model(
                ModelConfig(
                    placement="rezero", depth=1, d_model=8, heads=2, ffn=8, position_offset=2
                )
            )
        )
