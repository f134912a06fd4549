"""Structure detection on what users load: random-init tiny transformers configs (DeepSeek V3 and V4,
Qwen 3, OLMo 2, Gemma 2 and 3, Llama, GPT-2, BERT, T5, BART) and torch's nn.TransformerEncoder,
each read for its label, norm type and QK-norm; the reasons an unnamed placement is `other`; and
the line `collapse --ckpt` prints for a saved DeepSeek-V4 folder (offline, tiny)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_hf_config

from residual_probe.models import build_model
from residual_probe.probe import find_blocks
from residual_probe.probe.structure import DS_TOL, classify, detect_placement, doubly_stochastic

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

# encoder and encoder-decoder families by their class; the rest by AutoModelForCausalLM
CLASSES = {
    "bert": "BertForMaskedLM",
    "t5": "T5ForConditionalGeneration",
    "bart": "BartForConditionalGeneration",
}


def tiny(name: str):
    """A random-init tiny model of a transformers family in eval mode, its norm weights moved
    off 1 (trained-looking)."""
    torch.manual_seed(0)
    cfg = tiny_hf_config(name)
    if name in CLASSES:
        model = getattr(transformers, CLASSES[name])(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname.lower():
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


EXPECTED = {  # name: (placement, norm type, qk-norm)
    # low-rank q / kv latents normed inside attention: attention internals, not stream norms
    "deepseek_v3": ("pre-ln", "rmsnorm", True),
    # 4 copies mixed by Sinkhorn-projected (doubly stochastic) matrices
    "deepseek_v4": ("mhc", "rmsnorm", True),
    "qwen3": ("pre-ln", "rmsnorm", True),  # per-head q/k norms
    "olmo2": ("res-post-ln", "rmsnorm", True),  # full-width q/k norms, run inside attention
    "gemma2": ("sandwich", "rmsnorm", False),
    "gemma3": ("sandwich", "rmsnorm", True),
    "llama": ("pre-ln", "rmsnorm", False),
    "gpt2": ("pre-ln", "layernorm", False),
    "bert": ("post-ln", "layernorm", False),
    "t5": ("pre-ln", "rmsnorm", False),
    "bart": ("post-ln", "layernorm", False),
}


def detect(model):
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    if model.config.is_encoder_decoder:
        run = lambda: model(input_ids=ids, decoder_input_ids=ids)  # noqa: E731
    else:
        run = lambda: model(input_ids=ids)  # noqa: E731
    return detect_placement(find_blocks(model), run, model)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_transformers_families(name):
    found = detect(tiny(name))
    got = (found["placement"], found["norm_type"], found["qk_norm"])
    assert got == EXPECTED[name], found["detail"]
    assert found["reason"] is None


def test_deepseek_norms_by_what_they_receive():
    """V3's q_a_layernorm (width 32) and kv_a_layernorm (16) run inside attention: named as QK-norm,
    not probed as stream norms at width 64 (was "mixed: other, rmsnorm"); V4's hyper-connection
    mixers are named with their copies and how far their matrices are from doubly stochastic."""
    v3 = detect(tiny("deepseek_v3"))
    assert (
        "QK-norm in attention (self_attn.q_a_layernorm, self_attn.kv_a_layernorm)" in v3["detail"]
    )
    v4 = detect(tiny("deepseek_v4"))
    assert "hyper-connection mixers attn_hc, ffn_hc: 4 residual copies, 4 of 4" in v4["detail"]
    cfg = tiny_hf_config("deepseek_v4")
    cfg.hc_sinkhorn_iters = 1  # one column normalization: rows no longer sum to 1
    torch.manual_seed(0)
    hc = detect(transformers.AutoModelForCausalLM.from_config(cfg).eval())
    assert hc["placement"] == "hyper-connections (n=4)", hc["detail"]


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_transformer_encoder(norm_first):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=norm_first)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    found = detect_placement(find_blocks(model), lambda: model(x), model)
    want = "pre-ln" if norm_first else "post-ln"
    assert (found["placement"], found["norm_type"], found["qk_norm"]) == (want, "layernorm", False)


def test_reference_hyper_connections_by_their_mixing():
    """The hc / mhc reference placements: mHC's Sinkhorn mixing reads mhc, at init and trained;
    HC's reads hyper-connections (n=4): at init its identity mixing is doubly stochastic but a
    permutation, which says nothing; trained-looking it is not doubly stochastic."""
    ids = torch.randint(0, 50, (1, 8))
    labels = {}
    for placement in ("hc", "mhc"):
        for trained in (False, True):
            torch.manual_seed(0)
            model = build_model(
                placement=placement, arch="decoder", depth=2, d_model=16, heads=2, ffn=32
            ).eval()
            if trained:
                with torch.no_grad():
                    for pname, p in model.named_parameters():
                        if "_hc." in pname:
                            p.add_(0.4 * torch.randn_like(p))
            found = detect_placement(find_blocks(model), lambda m=model: m(ids), model)
            labels[placement, trained] = found["placement"]
    assert labels == {
        ("hc", False): "hyper-connections (n=4)",
        ("hc", True): "hyper-connections (n=4)",
        ("mhc", False): "mhc",
        ("mhc", True): "mhc",
    }


def test_doubly_stochastic_tolerance():
    m = torch.full((2, 4, 4), 0.25)
    assert doubly_stochastic(m)
    m[0, 0, 0] += 0.5 * DS_TOL  # row 0 and column 0 of one matrix off by half the tolerance
    assert doubly_stochastic(m)
    m[0, 0, 0] += DS_TOL
    assert not doubly_stochastic(m)
    neg = torch.tensor([[1.1, -0.1], [-0.1, 1.1]])  # sums to 1, a negative entry
    assert not doubly_stochastic(neg)


def test_other_says_why():
    """A placement the detector cannot name is `other` with the reason in words."""
    x, f, g = (torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    n = lambda t: torch.nn.functional.layer_norm(t, (8,))  # noqa: E731
    h = x + f  # y = x + Attn(x); then x <- LN(y) + FFN(LN(y)), and y <- y + FFN(LN(y))
    hybrid = classify((x,), (n(h) + g,), [(h, n(h))], [f, g], qk=True)
    assert hybrid == ("hybridnorm", None)
    kind, why = classify((x,), (n(h) + g,), [(h, n(h))], [f, g], qk=False)
    assert kind == "other" and "no q/k/v norms inside the attention" in why
    kind, why = classify((x,), (h + g,), [(h, n(h))], [f, g], qk=True)
    assert kind == "other" and "neither read the block input nor give its output" in why

    # blocks of different kinds in one stack: Pre-LN then Post-LN (Mix-LN is the other order)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=True)
    model = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    model.layers[2].norm_first = False
    x = torch.randn(2, 5, 16)
    found = detect_placement(find_blocks(model), lambda: model(x), model)
    assert found["placement"] == "other"
    assert found["reason"] == "blocks of different kinds (pre-ln 0-1, post-ln 2)"

    # stacks of different kinds: a Post-LN encoder and a Pre-LN decoder
    model = torch.nn.Transformer(16, 4, 1, 1, 32, dropout=0.0, batch_first=True).eval()
    model.decoder.layers[0].norm_first = True
    src, tgt = torch.randn(1, 5, 16), torch.randn(1, 4, 16)
    found = detect_placement(find_blocks(model), lambda: model(src, tgt), model)
    assert found["reason"] == "stacks differ (encoder post-ln, decoder pre-ln)"

    # HybridNorm's arrangement without its q/k/v norms
    model = build_model(placement="hybridnorm", arch="decoder", depth=2, d_model=16, heads=2).eval()
    for blk in model.decoder.layers:
        blk.self_attn.q_norm = blk.self_attn.k_norm = blk.self_attn.v_norm = None
    ids = torch.randint(0, 50, (1, 8))
    found = detect_placement(find_blocks(model), lambda: model(ids), model)
    assert (found["placement"], found["qk_norm"]) == ("other", False)
    assert "HybridNorm's FFN" in found["reason"]


def test_what_a_deepseek_v4_folder_prints(tmp_path):
    """A saved folder loaded as `collapse --ckpt` / `diagnose` load it: the line they print (the
    figures left out: the CLI run is in the report of issue 33)."""
    from residual_probe.cli.render import placement_line
    from residual_probe.jobs.inspection import CheckpointInputs, inspect_checkpoint

    tiny("deepseek_v4").save_pretrained(tmp_path / "v4")
    spec = CheckpointInputs(ckpts=(str(tmp_path / "v4"),))
    m = inspect_checkpoint("v4", str(tmp_path / "v4"), spec, "the residual stream " * 8)
    described = m.description()
    assert (described["placement_reason"], described["qk_norm"]) == (None, True)
    line = placement_line(described)
    assert line.startswith("  placement: mhc (from block structure; decoder: mhc 0-1; QK-norm")
    assert line.endswith("; norm: rmsnorm; qk-norm: yes")


def test_the_reason_is_printed_and_carried_and_old_files_still_read(tmp_path):
    import json

    from residual_probe.cli.render import placement_line
    from residual_probe.jobs.plot import guess_placement

    m = {
        "placement": "other",
        "placement_reason": "blocks of different kinds (pre-ln 0-1, post-ln 2)",
        "placement_detail": "encoder: pre-ln 0-1, post-ln 2",
        "declared_placement": None,
        "norm_type": "layernorm",
        "qk_norm": False,
    }
    assert placement_line(m) == (
        "  placement: other: blocks of different kinds (pre-ln 0-1, post-ln 2) (from block "
        "structure; encoder: pre-ln 0-1, post-ln 2); norm: layernorm; qk-norm: no"
    )
    old = {k: v for k, v in m.items() if k not in ("placement_reason", "qk_norm")}
    assert placement_line(old).endswith("post-ln 2); norm: layernorm")
    run = tmp_path / "probe_run.json"
    run.write_text(json.dumps({"placement": "other", "placement_reason": "why"}))
    assert guess_placement(tmp_path / "probe.csv") == ("other", "from probe_run.json", "why")
    run.write_text(json.dumps({"placement": "sandwich"}))  # written before reasons existed
    assert guess_placement(tmp_path / "probe.csv") == ("sandwich", "from probe_run.json", None)
