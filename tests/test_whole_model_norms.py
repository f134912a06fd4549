"""Whole-model gradient norms: the parts outside the blocks and the total, against
torch.nn.utils.clip_grad_norm_ (tied weights once, as PyTorch counts them), on a reference model
and on a Hugging Face GPT-2 whose head is tied to its embedding."""

import pytest
import torch

from residual_probe.models import ModelConfig, Transformer
from residual_probe.probe import Probe


def whole(rows):
    return {
        r["sublayer"]: r["value"]
        for r in rows
        if r["stack"] == "model" and r["metric"] == "param_grad_norm"
    }


def norm_of(params):
    return torch.sqrt(
        sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)
    ).item()


def test_reference_model_parts_and_total_match_clip_grad_norm():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            arch="decoder",
            placement="pre-ln",
            depth=3,
            d_model=16,
            heads=2,
            ffn=32,
            max_len=32,
            tie_embeddings=False,
        )
    ).double()
    x = torch.randint(0, 256, (2, 8))
    probe = Probe(model, quantities=("param_grad_norm",))
    with probe:
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        rows = probe.step()
    got = whole(rows)
    assert set(got) == {"embedding", "final_norm", "head", "total"} and not probe.parts.tied_head
    dec = model.decoder
    assert got["embedding"] == pytest.approx(norm_of(dec.embed.parameters()), rel=1e-12)
    assert got["final_norm"] == pytest.approx(norm_of(dec.final_norm.parameters()), rel=1e-12)
    assert got["head"] == pytest.approx(norm_of(model.output_projection.parameters()), rel=1e-12)
    clip = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9).item()
    assert got["total"] == pytest.approx(clip, rel=1e-9)


def test_tied_head_counted_once_as_clip_grad_norm_does():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    )
    assert model.lm_head.weight is model.transformer.wte.weight
    x = torch.randint(0, 64, (2, 8))
    probe = Probe(model, quantities=("param_grad_norm",))
    with probe:
        model(x, labels=x).loss.backward()
        rows = probe.step()
    got = whole(rows)
    assert probe.parts.tied_head and "head" not in got
    clip = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9).item()
    assert got["total"] == pytest.approx(clip, rel=1e-6)
    assert got["embedding"] == pytest.approx(
        norm_of([model.transformer.wte.weight, model.transformer.wpe.weight]), rel=1e-6
    )
    assert got["final_norm"] == pytest.approx(
        norm_of(model.transformer.ln_f.parameters()), rel=1e-6
    )


def test_per_tensor_norms_match_lightning_grad_norm():
    """param_tensor_norm (off by default) gives Lightning's grad_norm columns, names included."""
    pytest.importorskip("lightning")
    from lightning.pytorch.utilities import grad_norm

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            arch="decoder", placement="residual", depth=2, d_model=16, heads=2, ffn=32, max_len=32
        )
    )
    wrapped = torch.nn.Sequential()
    wrapped.add_module("module", model)  # a wrapper's "module." prefix is stripped, as DDP's
    x = torch.randint(0, 256, (2, 8))
    probe = Probe(wrapped, quantities=("param_grad_norm", "param_tensor_norm"))
    with probe:
        torch.nn.functional.cross_entropy(wrapped(x).flatten(0, 1), x.flatten()).backward()
        rows = probe.step()
    ours = {r["sublayer"]: r["value"] for r in rows if r["metric"] == "param_tensor_norm"}
    theirs = grad_norm(model, norm_type=2)
    total = theirs.pop("grad_2.0_norm_total")
    assert {f"grad_2.0_norm/{k}": v for k, v in ours.items()} == pytest.approx(
        {k: float(v) for k, v in theirs.items()}, rel=1e-4
    )
    assert whole(rows)["total"] == pytest.approx(float(total), rel=1e-4)
    from residual_probe.probe import DEFAULT_QUANTITIES

    assert "param_tensor_norm" not in DEFAULT_QUANTITIES  # off by default: a row per tensor
