"""attn_logits and output_logits against eager computations, in float64.

The twin never shares the probe's code: for Hugging Face models and nn.MultiheadAttention it runs
the same weights through the *eager* path and captures what `softmax` receives (patched
`torch.nn.functional.softmax`): the logits with the model's own scaling, RoPE, QK-norm,
soft-capping and mask; for the reference models it captures q and k at
`F.scaled_dot_product_attention` and writes the scores out. The probe runs the model as it is
(sdpa where the family supports it), so the wrapper around the model's own attention function is
what is tested. Entropy, maxima and log Z are then computed here by their definitions.
"""

import math
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from residual_probe.models import build_model
from residual_probe.probe import Probe
from residual_probe.probe.quantities import attn_logits as attn_mod

REL = 1e-9
QUANTITIES = ("attn_logits", "output_logits")


def twin_stats(logits: torch.Tensor) -> dict[str, float]:
    """attn_logit_max, attn_entropy and attn_entropy_min of captured logits (B, H, T, S); masked
    entries are -inf or the dtype's minimum added (below -1e30 here); a query row with no key is
    left out."""
    valid = logits > -1e30
    live = valid.any(-1)  # (B, H, T)
    peak = float(logits[valid].max())
    x = logits.masked_fill(~valid, -math.inf)
    p = torch.softmax(x, -1)
    ent = -(p * torch.where(valid, torch.log(p), 0.0)).sum(-1)  # (B, H, T)
    per_head = [float(ent[:, h][live[:, h]].mean()) for h in range(ent.shape[1])]
    return {
        "attn_logit_max": peak,
        "attn_entropy": float(ent[live].mean()),
        "attn_entropy_min": min(per_head),
    }


@contextmanager
def softmax_inputs():
    """Every tensor passed to torch.nn.functional.softmax inside, in call order; the softmax kept
    in the input's dtype (Llama's eager path asks for float32, which would make the twin's later
    blocks differ from a float64 model by ~1e-8)."""
    real, seen = F.softmax, []

    def capture(x, dim=None, _stacklevel=3, dtype=None):
        seen.append(x.detach().clone())
        return real(x, dim=dim)

    F.softmax = capture
    try:
        yield seen
    finally:
        F.softmax = real


def probe_rows(model, run, **kw):
    probe = Probe(model, quantities=QUANTITIES, **kw)
    with probe, warnings.catch_warnings():
        warnings.simplefilter("error")  # a model the probe fully sees says nothing
        out = run()
        rows = probe.step()
    return (
        probe,
        out,
        {(r["stack"], r["layer"], r["sublayer"], r["metric"]): r["value"] for r in rows},
    )


def z_stats(logits: torch.Tensor) -> dict[str, float]:
    x = logits.detach().reshape(-1, logits.shape[-1])
    log_z = torch.log(torch.exp(x).sum(-1))
    return {
        "logit_z_mean": float(log_z.mean()),
        "logit_z_max": float(log_z.max()),
        "logit_max": float(x.max()),
    }


def assert_rows(got: dict, stack: str, layer: int, want: dict, sublayer: str = "block"):
    for metric, value in want.items():
        assert got[(stack, layer, sublayer, metric)] == pytest.approx(value, rel=REL), metric


# ---- the reference models ------------------------------------------------------------------


def sdpa_scores():
    """Patch F.scaled_dot_product_attention to write out the logits it is given (test-side)."""
    real, seen = F.scaled_dot_product_attention, []

    def capture(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if is_causal:
            T, S = s.shape[-2:]
            s = s.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), -math.inf)
        seen.append(s.detach().clone())
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    return real, seen, capture


@pytest.mark.parametrize("qk_norm", [False, True])
def test_reference_seq2seq_attention_and_logits_equal_direct_float64(qk_norm, monkeypatch):
    torch.manual_seed(0)
    kw = dict(depth=2, d_model=16, heads=2, ffn=32, vocab_size=23, qk_norm=qk_norm)
    model = build_model(arch="seq2seq", placement="residual", **kw).double()
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(1, 23, (3, 6), generator=g), torch.randint(1, 23, (3, 5), generator=g)
    real, seen, capture = sdpa_scores()
    monkeypatch.setattr(F, "scaled_dot_product_attention", capture)
    with torch.no_grad():
        model.eval()
        want_logits = model(src, tgt)
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    model.train()
    # call order: encoder self 0, 1; decoder (self, cross) 0, then 1
    calls = {
        ("encoder", 0): [0],
        ("encoder", 1): [1],
        ("decoder", 0): [2, 3],
        ("decoder", 1): [4, 5],
    }

    def run():
        out = model(src, tgt)
        F.cross_entropy(out.flatten(0, 1), tgt.flatten()).backward()
        return out

    _, out, got = probe_rows(model, run)
    assert torch.allclose(out, want_logits, rtol=1e-12, atol=1e-12)
    for (stack, k), idx in calls.items():
        if len(idx) == 1:
            assert_rows(got, stack, k, twin_stats(seen[idx[0]]))
            continue
        for i, name in zip(idx, ("self_attn", "cross_attn")):
            assert_rows(got, stack, k, twin_stats(seen[i]), sublayer=name)
        parts = [twin_stats(seen[i]) for i in idx]
        rows = [seen[i].shape[0] * seen[i].shape[1] * seen[i].shape[2] for i in idx]
        peak = max(p["attn_logit_max"] for p in parts)
        assert got[(stack, k, "block", "attn_logit_max")] == pytest.approx(peak, rel=REL)
        mean = sum(p["attn_entropy"] * n for p, n in zip(parts, rows)) / sum(rows)
        assert got[(stack, k, "block", "attn_entropy")] == pytest.approx(mean, rel=REL)
        low = min(p["attn_entropy_min"] for p in parts)
        assert got[(stack, k, "block", "attn_entropy_min")] == pytest.approx(low, rel=REL)
    assert_rows(got, "model", -1, z_stats(want_logits), sublayer="head")


def test_long_sequences_take_a_seeded_query_subsample(monkeypatch):
    monkeypatch.setattr(attn_mod, "QUERY_LIMIT", 4)
    torch.manual_seed(0)
    model = build_model(
        arch="decoder", placement="pre-ln", depth=1, d_model=16, heads=2, ffn=32, vocab_size=23
    ).double()
    tok = torch.randint(1, 23, (2, 9), generator=torch.Generator().manual_seed(2))
    real, seen, capture = sdpa_scores()
    monkeypatch.setattr(F, "scaled_dot_product_attention", capture)

    def run():
        return model(tok)

    probe, _, got = probe_rows(model, run, include_eval=True)
    q = probe.quantity("attn_logits")
    q._step = 0
    pick = q._pick(9, 0, torch.device("cpu"))
    assert len(pick) == 4 and torch.equal(pick, pick.sort().values)
    assert_rows(got, "decoder", 0, twin_stats(seen[0][:, :, pick]))
    full = twin_stats(seen[0])
    assert got[("decoder", 0, "block", "attn_entropy")] != pytest.approx(full["attn_entropy"])
    _, _, again = probe_rows(model, run, include_eval=True)
    assert again == got  # seeded: the same positions for the same seed and step


# ---- Hugging Face ----------------------------------------------------------------------------


def hf_model(family: str, impl: str):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=32,
        num_attention_heads=4,
    )
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32)
        cls = T.GPT2LMHeadModel
    elif family == "llama":  # RoPE, grouped-query attention (4 query heads on 2 kv heads)
        cfg, cls = T.LlamaConfig(num_key_value_heads=2, **small), T.LlamaForCausalLM
    elif family == "qwen3":  # QK-norm (RMSNorm on each head's q and k)
        cfg = T.Qwen3Config(num_key_value_heads=2, head_dim=8, **small)
        cls = T.Qwen3ForCausalLM
    else:  # gemma2: attention soft-capping, a sliding window, final-logit soft-capping
        cfg = T.Gemma2Config(
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=3,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=8,
            **small,
        )
        cls = T.Gemma2ForCausalLM
    cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.0  # GPT-2: the twin is a second forward
    model = cls(cfg).double()
    model.set_attn_implementation(impl)
    if family == "qwen3":  # non-trivial QK-norm weights
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "q_norm" in n or "k_norm" in n:
                    p.add_(0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "family,impl,padded",
    [
        ("gpt2", "sdpa", True),
        ("llama", "sdpa", False),
        ("llama", "eager", True),
        ("qwen3", "sdpa", True),
        ("gemma2", "eager", False),
    ],
)
def test_hf_attention_equals_eager_float64(family, impl, padded):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = hf_model(family, impl)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 5:] = 0  # right padding in the second sequence
    model.set_attn_implementation("eager")
    with torch.no_grad(), softmax_inputs() as seen:
        model.eval()
        want = model(input_ids=ids, attention_mask=mask).logits
    assert len(seen) == 2
    model.set_attn_implementation(impl)
    model.train()
    local_before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    family_module = __import__(type(model).__module__, fromlist=["eager_attention_forward"])
    eager_before = family_module.eager_attention_forward

    def run():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        return out.logits

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # sdpa's math kernel: CPU's fused float64 kernel differs from eager by ~3e-8, which the
    # blocks after the first would carry into their q and k
    with sdpa_kernel(SDPBackend.MATH), softmax_inputs():  # eager: the same float64 softmax
        probe, out, got = probe_rows(model, run)
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-10)
    stack = probe.blocks[0].stack
    for k in range(2):
        assert_rows(got, stack, k, twin_stats(seen[k]))
    assert_rows(got, "model", -1, z_stats(want), sublayer="head")
    # the model's own attention functions are back as they were
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == local_before
    assert family_module.eager_attention_forward is eager_before
    if family == "gemma2":  # soft-capping bounds the logits: the cap is applied
        assert got[(stack, 0, "block", "attn_logit_max")] < 2.0
        assert got[("model", -1, "head", "logit_max")] < 3.0


def test_hf_unsupported_implementation_is_noted_not_measured():
    model = hf_model("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"  # not run: only announced
    with pytest.warns(UserWarning, match=r"cannot read the attention of LlamaDecoderLayer"):
        probe = Probe(model, quantities=("attn_logits",)).attach()
    probe.detach()


# ---- torch.nn.TransformerEncoder ------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_encoder_equals_its_softmax_inputs(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True: not allowed (torch's convention)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[2, 4:] = True

    def weights_pre_hook(m, args, kwargs):  # the twin: the need_weights path calls softmax
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    hooks = [
        blk.self_attn.register_forward_pre_hook(weights_pre_hook, with_kwargs=True)
        for blk in model.layers
    ]
    with torch.no_grad(), softmax_inputs() as seen:
        want = model(x, mask=causal, src_key_padding_mask=pad)
    for h in hooks:
        h.remove()

    def run():
        out = model(x, mask=causal, src_key_padding_mask=pad)
        out.sum().backward()
        return out

    probe, out, got = probe_rows(model, run)
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)
    for k in range(2):
        assert_rows(got, "encoder", k, twin_stats(seen[k].view(3, 4, 6, 6)))


# ---- a model the probe cannot see -------------------------------------------------------------


class OpaqueBlock(nn.Module):
    """Attention by hand (no module the probe knows)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return x + self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


def test_unseen_attention_is_one_note_naming_the_block_class_and_no_rows():
    model = nn.Sequential()
    model.layers = nn.ModuleList(OpaqueBlock() for _ in range(2))
    model.forward = lambda x: model.layers[1](model.layers[0](x))
    with pytest.warns(UserWarning, match="cannot see the attention of OpaqueBlock") as said:
        probe = Probe(model, quantities=("attn_logits", "forward_stats"))
        with probe:
            model(torch.randn(2, 3, 8)).sum().backward()
            rows = probe.step()
    assert sum("OpaqueBlock" in str(w.message) for w in said) == 1
    assert not any(r["metric"].startswith("attn_") for r in rows)
    assert any(r["metric"] == "cos_adjacent" for r in rows)  # the rest is recorded


def test_summary_keys_of_the_new_rows():
    from residual_probe.probe.scalars import summary

    torch.manual_seed(0)
    model = build_model(
        arch="decoder", placement="pre-ln", depth=2, d_model=16, heads=2, ffn=32, vocab_size=23
    )
    tok = torch.randint(1, 23, (2, 5))
    probe = Probe(model)
    with probe:
        model(tok).sum().backward()
        rows = probe.step()
    keys = summary(rows)
    want = {r["metric"]: r["value"] for r in rows if r["layer"] == 1 and r["sublayer"] == "block"}
    assert keys["probe/attn_logit_max/decoder/01"] == want["attn_logit_max"]
    assert keys["probe/attn_entropy_min/decoder/00"] > 0
    head = {r["metric"]: r["value"] for r in rows if r["sublayer"] == "head"}
    assert keys["probe/logit_z_mean"] == head["logit_z_mean"] and "probe/logit_max" in keys
