"""The probe on Hugging Face GPT-2, BERT and Llama configurations, in float64, against a naive twin.

The twin is a separate forward with plain test-side hooks that keep every block's full input
and output (retain_grad), and per-token formulas written out here; parameter norms come
straight from `.grad` by parameter name.
"""

import math

import pytest
import torch
from conftest import assert_values_close
from test_discovery import build_hf
from test_probe import ATTENTION, naive_act, naive_stats

from residual_probe.probe import Probe

pytest.importorskip("transformers")

# family: (parameter-name prefixes of each group inside a block, W2 of the last block)
GROUPS = {
    "gpt2": ({"attention": ("attn.",), "ffn": ("mlp.",), "norm": ("ln_1.", "ln_2.")}, "mlp.c_proj"),
    "bert": (
        {
            "attention": ("attention.self.", "attention.output.dense."),
            "ffn": ("intermediate.", "output.dense."),
            "norm": ("attention.output.LayerNorm.", "output.LayerNorm."),
        },
        "output.dense",
    ),
    "llama": (
        {
            "attention": ("self_attn.",),
            "ffn": ("mlp.",),
            "norm": ("input_layernorm.", "post_attention_layernorm."),
        },
        "mlp.down_proj",
    ),
}


def norm_of(params):
    return math.sqrt(sum(float((p.grad**2).sum()) for p in params))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (2, 6), generator=g)
    return {"input_ids": ids, "labels": ids}


def twin(model, family, inputs):
    """Expected rows from a plain forward with test-side capture hooks."""
    layers = [
        m
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1].isdigit() and type(m).__name__.endswith(("Block", "Layer"))
    ]
    cap, handles = [], []
    for blk in layers:

        def hook(mod, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            h_out.retain_grad()
            cap.append((h_in, h_out))

        handles.append(blk.register_forward_hook(hook, with_kwargs=True))
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    for h in handles:
        h.remove()
    groups, w2 = GROUPS[family]
    ref = {}
    for k, (blk, (h_in, h_out)) in enumerate(zip(layers, cap)):
        for metric, v in naive_stats(h_in, h_out).items():
            ref[(k, "block", "x", metric)] = v
        ref[(k, "block", "x", "act_grad_norm")] = naive_act(h_out.grad)
        named = dict(blk.named_parameters())
        ref[(k, "block", "-", "param_grad_norm")] = norm_of(named.values())
        for sub, mod in blk.named_children():
            ps = list(mod.parameters())
            if ps and "norm" not in sub.lower() and "ln_" not in sub:
                ref[(k, sub, "-", "param_grad_norm")] = norm_of(ps)
        for g, prefixes in groups.items():
            ref[(k, f"group:{g}", "-", "param_grad_norm")] = norm_of(
                p
                for n, p in named.items()
                if n.startswith(prefixes) and not (g != "norm" and n.startswith(groups["norm"]))
            )
    last = len(layers) - 1
    ref[(last, w2, "-", "w2_grad_norm")] = float(layers[last].get_submodule(w2).weight.grad.norm())
    model.zero_grad(set_to_none=True)
    return ref


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_hf_quantities_equal_naive_float64(family):
    model = build_hf(family).double().eval()
    inputs = batch()
    ref = twin(model, family, inputs)
    probe = Probe(
        model, subsample_tokens=5, include_eval=True
    )  # eval(): no dropout, so the twin matches
    with probe:
        model(**inputs).loss.backward()
        rows = probe.step()
    got = {
        (r["layer"], r["sublayer"], r["stream"], r["metric"]): r["value"]
        for r in rows
        if r["layer"] >= 0 and r["metric"] not in ATTENTION  # tests/test_attention_probe.py
    }
    assert {r["metric"] for r in rows} >= set(ATTENTION)  # BERT's too: through its interface
    assert_values_close(got, ref)
    ((key, sub),) = probe.subsamples().items()
    assert sub.shape == (3, 5, 32)


def test_hf_outputs_unchanged_by_the_probe():
    model = build_hf("gpt2").eval()
    ids = batch()["input_ids"]
    before = model(ids).logits
    with Probe(model):
        during = model(ids).logits
    assert torch.equal(before, during) and torch.equal(before, model(ids).logits)


@pytest.mark.parametrize("family", ["roberta", "gpt_neox", "mistral", "qwen2", "t5", "vit"])
def test_every_family_records_every_block(family):
    model = build_hf(family).eval()
    if family == "vit":
        inputs = {
            "pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        }
        loss_of = lambda out: out.last_hidden_state.square().mean()  # noqa: E731
    else:
        inputs = batch()
        if family == "t5":
            inputs["decoder_input_ids"] = inputs["input_ids"][:, :4].contiguous()
            inputs["labels"] = inputs["input_ids"][:, 1:5].contiguous()
        loss_of = lambda out: out.loss  # noqa: E731
    probe = Probe(model, subsample_tokens=4, include_eval=True)
    with probe:
        loss_of(model(**inputs)).backward()
        rows = probe.step()
    per_block = {}
    for r in rows:
        if r["layer"] >= 0:
            per_block.setdefault((r["stack"], r["layer"]), set()).add(r["metric"])
            assert math.isfinite(r["value"]), r
    assert len(per_block) == len(probe.blocks)
    for metrics in per_block.values():
        assert {"param_grad_norm", "act_grad_norm", "cos_adjacent", "ln_update"} <= metrics
    assert sum("w2_grad_norm" in m for m in per_block.values()) == len(
        {b.stack for b in probe.blocks}
    )
    assert len(probe.subsamples()) == len({b.stack for b in probe.blocks})
