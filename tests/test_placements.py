"""Every placement against docs/design.md's equations, block by block, in float64.

The reference formulas below are written out independently of placements.py: each one
recomputes a block's output from the block's own sublayers (F) and norms.
"""

import math

import pytest
import torch
from conftest import tiny_model

from residual_probe.models import PLACEMENTS, ConfigError, ModelConfig, build_model
from residual_probe.models.placements import (
    admin_profile_tokens,
    deepnorm_constants,
    tfixup_constants,
)

SMALL = dict(d_model=16, heads=2, ffn=32, depth=4, vocab_size=50, max_len=64)


def tiny(placement, arch="decoder", **kw):
    model = tiny_model(placement, arch, **{**SMALL, **kw}).double()
    # Non-trivial norm affines, ReZero gates, Admin's omegas and nGPT's scales (alpha, s_qk, s_u,
    # s_z) so that every term of each formula matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("gate", "omega", ".stored")) or "_hc." in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def reference_block(placement, blk, x, memory, depth, mix_ratio=0.25, s_res=1.0):
    """docs/design.md's per-block formula, spelled out for each placement."""
    k = blk.k
    fs = [(lambda h: blk.self_attn(h), blk.self_attn)]
    if blk.cross_attn is not None:
        fs.append((lambda h: blk.cross_attn(h, memory), blk.cross_attn))
    fs.append((lambda h: blk.ffn(h), blk.ffn))
    if placement == "b2t":
        h = x
        for f, s in fs[:-1]:
            h = s.norm(h + f(h))
        f, s = fs[-1]
        return s.norm(h + f(h) + x)
    if placement in ("hc", "mhc"):
        hcs = [blk.attn_hc] + ([blk.cross_hc] if memory is not None else []) + [blk.ffn_hc]
        for (f, s), hc in zip(fs, hcs, strict=True):
            pre, post, comb = hyper_weights(hc, x, constrained=placement == "mhc")
            y = f(s.norm(torch.einsum("btj,btjc->btc", pre, x)))
            x = torch.einsum("btjk,btjc->btkc", comb, x) + post[..., None] * y[..., None, :]
        return x
    if placement == "residual":
        x, d = x
        for f, s in fs:
            b = f(x)
            d = d + s_res * b  # microsoft/ResiDual: res = res + x * res_input_norm_scale
            x = s.norm(x + b)
        return x, d
    for f, s in fs:
        if placement == "post-ln" or (placement == "mix-ln" and k < int(mix_ratio * depth)):
            x = s.norm(x + f(x))
        elif placement in ("pre-ln", "mix-ln"):
            x = x + f(s.norm(x))
        elif placement == "deepnorm":
            alpha = blk.placement.alpha
            x = s.norm(alpha * x + f(x))
        elif placement in ("sandwich", "peri-ln"):
            x = x + s.out_norm(f(s.norm(x)))
        elif placement == "lns":
            x = x + f(s.norm(x) / math.sqrt(k + 1))
        elif placement == "rezero":
            x = x + blk.gate * f(x)
        elif placement == "dyt":  # Zhu et al. 2025: every LN is gamma * tanh(alpha * x) + beta
            x = x + f(dyt(s.norm, x))
        elif placement == "dyt-llama":  # the LLaMA recipe: gamma * tanh(alpha * x), no beta
            x = x + f(dyt(s.norm, x, bias=False))
        elif placement == "hybridnorm-star" and k == 0:  # HybridNorm*: block 0 is Pre-Norm
            assert s.norm is not None
            x = x + f(s.norm(x))
        elif placement == "deepscale":  # Kedia et al. 2024: lambda^2 + beta^2 = 1, beta^2 = 2/N
            beta = math.sqrt(min(1.0, 2 / depth))
            x = math.sqrt(1 - beta**2) * x + beta * f(s.norm(x))
        elif placement in (
            "hybridnorm",
            "hybridnorm-star",
        ):  # Zhuo et al. 2025: no pre-norm on attention (QKV-norm
            if s is blk.ffn:  # inside it); y = x + Attn(x), then LN(y) + FFN(LN(y))
                x = s.norm(x) + f(s.norm(x))
            else:
                assert s.norm is None and s.v_norm is not None and s.q_norm is not None
                x = x + f(x)
        elif placement == "ngpt":  # Loshchilov et al. 2024: h <- l2(h + |alpha| (l2(F(h)) - h)),
            # alpha stored at d^-1/2 and used times 0.05 / d^-1/2 (NVIDIA/ngpt attn_alpha)
            assert s.norm is None
            a = (s.alpha.stored * 0.05 * math.sqrt(x.shape[-1])).abs()
            x = l2(x + a * (l2(f(x)) - x))
        elif placement == "tfixup":  # Huang et al. 2020: no LayerNorm at all
            assert s.norm is None
            x = x + f(x)
        elif placement == "admin":  # Liu et al. 2020: x_i = LN(x_{i-1} * omega_i + f_i(x_{i-1}))
            x = s.norm(x * s.omega + f(x))
        else:
            raise AssertionError(placement)
    return x


def hyper_weights(hc, h, constrained):
    """(pre, post, comb) of one hyper-connection, written out: static + dynamic (per-stream RMS
    norm, tanh for HC); mHC: sigmoid, 2 sigmoid and 20 Sinkhorn-Knopp rounds (columns, rows)."""
    n = h.shape[-2]
    alpha = hc.static_alpha.expand(*h.shape[:-1], n + 1)
    beta = hc.static_beta.expand(*h.shape[:-1])
    if hc.dynamic:
        normed = h / (h.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * hc.norm.weight
        act = (lambda t: t) if constrained else torch.tanh
        s_pre, s_res = hc.dynamic_alpha_scale
        dyn = act(normed @ hc.dynamic_alpha_fn)
        alpha = alpha + torch.cat([dyn[..., :1] * s_pre, dyn[..., 1:] * s_res], dim=-1)
        beta = beta + act(normed @ hc.dynamic_beta_fn) * hc.dynamic_beta_scale
    pre, comb, post = alpha[..., 0], alpha[..., 1:], beta
    if constrained:
        pre, post = 1 / (1 + torch.exp(-pre)), 2 / (1 + torch.exp(-post))
        comb = torch.exp(comb)
        for _ in range(20):
            comb = comb / comb.sum(-2, keepdim=True)
            comb = comb / comb.sum(-1, keepdim=True)
    return pre, post, comb


def l2(x):
    return x / x.norm(dim=-1, keepdim=True)


def dyt(norm, x, bias=True):
    assert set(dict(norm.named_parameters())) == {"alpha", "weight"} | ({"bias"} if bias else set())
    assert norm.alpha.shape == (1,)
    y = torch.tanh(norm.alpha * x) * norm.weight
    return y + norm.bias if bias else y


def close(a, b):
    if isinstance(a, tuple):
        return all(close(u, v) for u, v in zip(a, b, strict=True))
    return torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["decoder", "seq2seq"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_every_block_matches_its_equation(placement, arch):
    # Non-default ResiDual scale and Mix-LN ratio, so that s and the switch point matter.
    model = tiny(placement, arch, res_input_norm_scale=0.3, mix_ratio=0.6)
    tokens = torch.randint(1, 50, (2, 7))
    stack = model.decoder
    memory = model.encoder(tokens) if arch == "seq2seq" else None
    state = stack.placement.begin(stack.embed(tokens), stack)
    for blk in stack.layers:
        expected = reference_block(
            placement, blk, state, memory, depth=len(stack.layers), mix_ratio=0.6, s_res=0.3
        )
        state = blk(state, memory)
        assert close(state, expected), f"{placement} block {blk.k}"


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_stack_start_and_end(placement):
    """Embedding -> begin -> blocks -> end, with docs/design.md's end-of-stack column."""
    model = tiny(placement)
    stack = model.decoder
    tokens = torch.randint(1, 50, (2, 7))
    x0 = stack.embed(tokens)
    x = stack.embed_norm(x0) if placement == "peri-ln" else x0
    x = l2(x0) if placement == "ngpt" else x  # nGPT's stream starts on the unit sphere
    state = (x, 1.0 * x0) if placement == "residual" else x
    if placement in ("hc", "mhc"):
        state = x0[..., None, :].repeat(1, 1, 4, 1)
    for blk in stack.layers:
        state = blk(state)
    if placement == "residual":
        x, d = state
        expected = 1.0 * x + torch.nn.functional.layer_norm(
            d, (16,), stack.final_norm.weight, stack.final_norm.bias, eps=1e-7
        )
    elif placement in (
        "pre-ln",
        "sandwich",
        "peri-ln",
        "mix-ln",
        "lns",
        "hybridnorm",
        "hybridnorm-star",
        "deepscale",
    ):
        expected = stack.final_norm(state)
    elif placement == "dyt":
        expected = dyt(stack.final_norm, state)
    elif placement == "dyt-llama":
        expected = dyt(stack.final_norm, state, bias=False)
    elif placement in ("hc", "mhc"):  # the embedding copied to n streams; LN of their sum
        assert state.shape[-2] == 4
        expected = stack.final_norm(state.sum(-2))
    else:
        assert stack.final_norm is None
        expected = state
    assert close(stack(tokens), expected)


def test_residual_dual_stream_start_scale_and_alpha():
    model = tiny("residual", res_input_norm_scale=0.5, alpha=2.0)
    stack = model.decoder
    assert stack.final_norm.eps == 1e-7
    assert all(s.norm.eps == 1e-5 for blk in stack.layers for s in blk.sublayers())
    tokens = torch.randint(1, 50, (1, 5))
    x0 = stack.embed(tokens)
    x, d = stack.placement.begin(x0, stack)
    assert torch.equal(x, x0) and close(d, 0.5 * x0)
    for blk in stack.layers:
        x, d = blk((x, d))
    assert close(stack(tokens), 2.0 * x + stack.final_norm(d))


def released_residual_logits(model, src, tgt, s):
    """A port of microsoft/ResiDual's forward (resi_dual.py, resi_dual_layers.py), written from
    the released code's statements and sharing only the weights: res = x * s at the embedding,
    then `res = res + x * s` after each sublayer's dropout, `x = LN(x + xr)`, and at the end
    `x * alpha + layer_norm(res)` with eps 1e-7."""
    import torch.nn.functional as F

    def mha(attn, q_in, kv_in, causal):
        B, T, C = q_in.shape
        H = attn.heads

        def split(t):
            return t.view(B, -1, H, C // H).transpose(1, 2)

        q = split(attn.q_proj(q_in)) * (C // H) ** -0.5  # fairseq scales q before q k^T
        k, v = split(attn.k_proj(kv_in)), split(attn.v_proj(kv_in))
        w = q @ k.transpose(-1, -2)
        if causal:
            w = w.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return attn.out_proj((w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))

    def stack(st, tokens, enc):
        x = st.embed(tokens)
        res = x * s
        for layer in st.layers:
            subs = [(layer.self_attn, lambda h, a=layer.self_attn: mha(a, h, h, enc is not None))]
            if layer.cross_attn is not None:
                subs.append((layer.cross_attn, lambda h, a=layer.cross_attn: mha(a, h, enc, False)))
            subs.append((layer.ffn, lambda h, f=layer.ffn: f.fc2(F.relu(f.fc1(h)))))
            for sub, fn in subs:
                xr = x
                x = fn(x)
                res = res + x * s
                x = sub.norm(x + xr)
        ln = st.final_norm
        return x * model.cfg.alpha + F.layer_norm(res, res.shape[-1:], ln.weight, ln.bias, eps=1e-7)

    enc = stack(model.encoder, src, None)
    return model.output_projection(stack(model.decoder, tgt, enc))


@pytest.mark.parametrize("s", [1.0, 0.1])
def test_residual_matches_a_port_of_the_released_code(s):
    """Scaling only d_0 (the earlier reading) made s a real weighting: max logit difference 3.79
    at s = 0.1 against this port. Scaling every update as the released code does makes the
    model agree with it, and makes the logits independent of s up to LN_f's eps."""
    model = tiny("residual", arch="seq2seq", res_input_norm_scale=s)
    src, tgt = torch.randint(1, 50, (2, 6)), torch.randint(1, 50, (2, 5))
    ours = model(src, tgt)
    assert torch.allclose(
        ours, released_residual_logits(model, src, tgt, s), rtol=1e-10, atol=1e-10
    )
    if s != 1.0:
        ones = tiny("residual", arch="seq2seq", res_input_norm_scale=1.0)
        assert (ours - ones(src, tgt)).abs().max() < 1e-5  # only LN_f's eps sees s


def test_residual_seq2seq_cross_attention_reads_combined_encoder_output():
    model = tiny("residual", arch="seq2seq")
    src, tgt = torch.randint(1, 50, (2, 6)), torch.randint(1, 50, (2, 5))
    enc_x, enc_d = model.encoder.placement.begin(model.encoder.embed(src), model.encoder)
    for blk in model.encoder.layers:
        enc_x, enc_d = blk((enc_x, enc_d))
    memory = enc_x + model.encoder.final_norm(enc_d)
    logits = model.output_projection(model.decoder(tgt, memory))
    assert close(model(src, tgt), logits)


@pytest.mark.parametrize("arch,N,M", [("encoder", 6, 0), ("decoder", 0, 12), ("seq2seq", 6, 12)])
def test_deepnorm_constants(arch, N, M):
    depth = N or M
    cfg = ModelConfig(
        arch=arch,
        placement="deepnorm",
        depth=depth,
        decoder_depth=M if arch == "seq2seq" else None,
        **{k: v for k, v in SMALL.items() if k != "depth"},
    )
    if arch == "encoder":
        assert deepnorm_constants(cfg, "encoder") == pytest.approx(
            ((2 * N) ** 0.25, (8 * N) ** -0.25)
        )
    elif arch == "decoder":
        assert deepnorm_constants(cfg, "decoder") == pytest.approx(
            ((2 * M) ** 0.25, (8 * M) ** -0.25)
        )
    else:
        # The DeepNet paper's encoder beta, 0.87 (N^4 M)^(-1/16), not torchscale's 1.15 (N^4 M)^(-1/16).
        assert deepnorm_constants(cfg, "encoder") == pytest.approx(
            (0.81 * (N**4 * M) ** (1 / 16), 0.87 * (N**4 * M) ** (-1 / 16))
        )
        assert deepnorm_constants(cfg, "encoder")[1] == pytest.approx(
            0.87 * 6**-0.25 * 12 ** (-1 / 16)
        )
        assert deepnorm_constants(cfg, "decoder") == pytest.approx(
            ((3 * M) ** 0.25, (12 * M) ** -0.25)
        )


def test_deepnorm_beta_scales_v_out_fc1_fc2_only():
    torch.manual_seed(0)
    post = build_model(ModelConfig(arch="decoder", placement="post-ln", **SMALL))
    torch.manual_seed(0)
    deep = build_model(ModelConfig(arch="decoder", placement="deepnorm", **SMALL))
    beta = deep.decoder.placement.beta
    assert beta == pytest.approx((8 * 4) ** -0.25)
    for (name, p), (name2, q) in zip(post.named_parameters(), deep.named_parameters(), strict=True):
        assert name == name2
        scaled = any(f".{n}." in name for n in ("v_proj", "out_proj", "fc1", "fc2"))
        assert torch.allclose(q, beta * p if scaled else p), name


@pytest.mark.parametrize(
    "ratio,depth,switch",
    [
        (0.25, 8, 2),
        (0.25, 6, 1),
        (0.5, 5, 2),
        (0.0, 4, 0),
        (1.0, 4, 4),
        (0.2, 4, 0),
        (15 / 22, 22, 15),
    ],
)
def test_mix_ln_switch_point(ratio, depth, switch):
    """floor(rho * N) Post-LN blocks, an integer count as in the Mix-LN paper and code (ceil gave 2, 3, 1
    for the second, third and last cases)."""
    model = tiny("mix-ln", depth=depth, mix_ratio=ratio)
    assert model.decoder.placement.switch == switch
    # Post-LN throughout keeps no final LN; any Pre-LN block brings one.
    assert (model.decoder.final_norm is None) == (switch == depth)


def test_lns_scales_block_k_by_inverse_sqrt_k():
    model = tiny("lns")
    blk = model.decoder.layers[3]  # k = 4 (1-indexed)
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    h = x + blk.self_attn(blk.self_attn.norm(x) / 2.0)
    assert close(blk(x), h + blk.ffn(blk.ffn.norm(h) / 2.0))


def test_rezero_is_identity_at_init():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="decoder", placement="rezero", **SMALL)).double()
    tokens = torch.randint(1, 50, (2, 6))
    assert all(float(b.gate.detach()) == 0.0 for b in model.decoder.layers)
    assert torch.equal(model.decoder(tokens), model.decoder.embed(tokens))


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_a_few_adam_steps_lower_the_loss(placement):
    """Through the one training loop, so that a placement's after-step hook runs (nGPT's unit
    rows). 25 steps: nGPT starts at the uniform loss (logits s_z * cos, s_z = 1) and its s_z moves
    by lr * sqrt(d) a step by design; its loss is at 0.92 of the first after 15 steps, 0.87 after 25."""
    from residual_probe.data import BatchSource
    from residual_probe.training import Trainer

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            arch="decoder", placement=placement, d_model=32, heads=2, ffn=64, depth=3, vocab_size=20
        )
    )
    batch = BatchSource(
        "decoder", 4, 12, 20, seed=0
    ).next()  # one fixed batch: the loss must fall on it
    trainer = Trainer(model, lr=3e-3)
    first = float(trainer.step(batch))
    for _ in range(24):
        trainer.step(batch)
    assert float(trainer.step(batch, update=False)) < 0.9 * first


def test_config_rejects_unknown_keys_and_conflicts():
    with pytest.raises(ConfigError, match="unknown config keys: colour"):
        ModelConfig.from_dict({"colour": 1})
    with pytest.raises(
        ConfigError, match="placement: unknown 'pre_ln'; choose one of post-ln, pre-ln"
    ):
        ModelConfig(placement="pre_ln")
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=10, heads=3)
    with pytest.raises(ConfigError, match="depth: must be a positive integer"):
        ModelConfig(depth=0)
    with pytest.raises(ConfigError, match="decoder_depth: only for arch 'seq2seq'"):
        ModelConfig(arch="decoder", decoder_depth=3)


def test_config_json_round_trip():
    cfg = ModelConfig(
        arch="seq2seq", placement="residual", depth=3, decoder_depth=5, alpha=0.5, norm="rmsnorm"
    )
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    model = build_model(cfg)
    assert len(model.encoder.layers) == 3 and len(model.decoder.layers) == 5
    assert (cfg.stack_depth("encoder"), cfg.stack_depth("decoder")) == (3, 5)
    one_stack = [ModelConfig(arch=a, depth=4) for a in ("encoder", "decoder")]
    assert [(c.stack_depth("encoder"), c.stack_depth("decoder")) for c in one_stack] == [
        (4, 0),
        (0, 4),
    ]


def test_config_new_keys_strict_and_round_trip():
    cfg = ModelConfig(
        arch="seq2seq",
        placement="residual",
        dropout=0.3,
        attention_dropout=0.1,
        activation_dropout=0.1,
        share_all_embeddings=True,
        res_input_norm_scale=0.5,
    )
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="attention_dropout: must be in"):
        ModelConfig(attention_dropout=1.0)
    with pytest.raises(ConfigError, match="activation_dropout: must be in"):
        ModelConfig(activation_dropout=-0.1)
    with pytest.raises(ConfigError, match="share_all_embeddings: only for arch 'seq2seq'"):
        ModelConfig(arch="decoder", share_all_embeddings=True)
    with pytest.raises(ConfigError, match="share_all_embeddings=True needs tie_embeddings=True"):
        ModelConfig(share_all_embeddings=True, tie_embeddings=False)
    with pytest.raises(ConfigError, match="res_input_norm_scale: must be positive"):
        ModelConfig(res_input_norm_scale=0.0)
    with pytest.raises(ConfigError, match="unknown config keys: attn_dropout"):
        ModelConfig.from_dict({"attn_dropout": 0.1})


def test_config_json_without_the_new_keys_still_loads_with_its_old_meaning():
    """A config.json written before attention_dropout/activation_dropout/share_all_embeddings
    existed: its single `dropout` still applies to attention weights and activations."""
    old = {
        k: v
        for k, v in ModelConfig(dropout=0.2).to_dict().items()
        if k not in ("attention_dropout", "activation_dropout", "share_all_embeddings")
    }
    cfg = ModelConfig.from_dict(old)
    assert cfg.attention_dropout_rate == cfg.activation_dropout_rate == 0.2
    assert cfg.share_all_embeddings is False
    model = build_model(cfg.replace(**SMALL))
    blk = model.decoder.layers[0]
    assert blk.self_attn.attn_dropout == 0.2 and blk.ffn.act_dropout.p == 0.2


def test_three_dropout_rates_act_where_fairseq_puts_them():
    cfg = ModelConfig(
        arch="seq2seq", dropout=0.3, attention_dropout=0.1, activation_dropout=0.05, **SMALL
    )
    model = build_model(cfg)
    blk = model.decoder.layers[0]
    assert model.decoder.embed.dropout.p == 0.3
    for attn in (blk.self_attn, blk.cross_attn):
        assert attn.dropout.p == 0.3 and attn.attn_dropout == 0.1
    assert blk.ffn.dropout.p == 0.3 and blk.ffn.act_dropout.p == 0.05
    # Behaviour, not only attributes: with only attention dropout on, the attention output
    # changes in training mode and the FFN does not.
    only_attn = build_model(ModelConfig(arch="decoder", attention_dropout=0.5, **SMALL)).train()
    blk = only_attn.decoder.layers[0]
    h = torch.randn(2, 6, 16)
    torch.manual_seed(1)
    a1 = blk.self_attn(h)
    torch.manual_seed(2)
    assert not torch.allclose(a1, blk.self_attn(h))
    assert torch.equal(blk.ffn(h), blk.ffn(h))


def test_share_all_embeddings_is_one_table():
    model = build_model(ModelConfig(arch="seq2seq", share_all_embeddings=True, **SMALL))
    emb = model.decoder.embed_tokens
    assert model.encoder.embed_tokens is emb and model.output_projection.weight is emb.weight
    n_shared = sum(p.numel() for p in model.parameters())
    n_sep = sum(p.numel() for p in build_model(ModelConfig(arch="seq2seq", **SMALL)).parameters())
    assert n_sep - n_shared == 50 * 16


def test_untied_output_projection_is_fairseq_normal():
    """fairseq's TransformerDecoderBase: an output projection of its own is N(0, d^-1/2)."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            arch="decoder",
            tie_embeddings=False,
            d_model=64,
            heads=2,
            ffn=64,
            depth=1,
            vocab_size=4000,
        )
    )
    w = model.output_projection.weight.detach()
    assert w.mean().abs() < 3 * 64**-0.5 / math.sqrt(w.numel())
    assert w.std().item() == pytest.approx(
        64**-0.5, rel=0.02
    )  # PyTorch's default gives 1/sqrt(3*64)
    kurt = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert kurt.item() == pytest.approx(3.0, abs=0.15)  # normal, not uniform (1.8)


def test_iwslt_preset_is_the_released_config():
    cfg = ModelConfig.iwslt(vocab_size=100)
    assert (cfg.arch, cfg.depth, cfg.d_model, cfg.ffn, cfg.heads) == ("seq2seq", 6, 256, 1024, 4)
    assert (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout) == (0.3, 0.1, 0.1)
    assert cfg.share_all_embeddings and cfg.tie_embeddings and cfg.placement == "residual"
    assert ModelConfig.iwslt(placement="post-ln").placement == "post-ln"


def hand_attention(attn, h, memory=None):
    """Multi-head attention with QK-norm written out in float64: per head, q and k normalized over
    head_dim by the attention's own q_norm/k_norm affines, softmax(q k^T / sqrt(head_dim) + causal)."""
    B, T, C = h.shape
    src = h if memory is None else memory
    H = attn.heads
    Dh = C // H

    def heads(t):
        return t.view(B, -1, H, Dh).transpose(1, 2)

    def norm(x, mod):
        if isinstance(mod, torch.nn.LayerNorm):
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias
        return x / torch.sqrt((x**2).mean(-1, keepdim=True) + mod.eps) * mod.weight

    q = norm(heads(h @ attn.q_proj.weight.T + attn.q_proj.bias), attn.q_norm)
    k = norm(heads(src @ attn.k_proj.weight.T + attn.k_proj.bias), attn.k_norm)
    v = heads(src @ attn.v_proj.weight.T + attn.v_proj.bias)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    if attn.causal and memory is None:
        S = k.shape[2]
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), -math.inf)
    y = torch.softmax(scores, -1) @ v
    return y.transpose(1, 2).reshape(B, T, C) @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("placement", ["post-ln", "pre-ln", "residual"])
def test_qk_norm_block_equals_a_hand_computation(placement, norm):
    model = tiny(placement, "seq2seq", norm=norm, qk_norm=True)  # perturbs the q/k norm affines too
    blk = model.decoder.layers[1]
    assert blk.self_attn.q_norm.weight.shape == (SMALL["d_model"] // SMALL["heads"],)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, SMALL["d_model"], dtype=torch.float64, generator=g)
    memory = torch.randn(2, 7, SMALL["d_model"], dtype=torch.float64, generator=g)
    with torch.no_grad():
        for attn, mem in ((blk.self_attn, None), (blk.cross_attn, memory)):
            assert torch.allclose(attn.branch(h, mem), hand_attention(attn, h, mem), 1e-12, 1e-12)
        # and the block as a whole is still its placement's formula, with those sublayers
        x = (h, h.clone()) if placement == "residual" else h
        want = reference_block(placement, blk, x, memory, SMALL["depth"])
        assert close(blk(x, memory), want)
    plain = tiny(placement, "seq2seq", norm=norm)
    assert plain.decoder.layers[1].self_attn.q_norm is None  # off by default: the model as before
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    per_norm = (2 if norm == "layernorm" else 1) * SMALL["d_model"] // SMALL["heads"]
    attentions = 3 * SMALL["depth"]  # encoder self; decoder self and cross
    assert params(model) - params(plain) == attentions * 2 * per_norm


def test_z_loss_term_equals_a_direct_computation():
    from residual_probe.data import BatchSource
    from residual_probe.training import Trainer, lm_losses

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="decoder", placement="pre-ln", **SMALL)).double()
    batch = BatchSource("decoder", 3, 6, SMALL["vocab_size"], seed=2).next()
    batch.targets = batch.targets.clone()  # a view of the inputs' sequence
    batch.targets[0, :2] = -100  # ignored targets carry no z-loss either
    with torch.no_grad():
        ce, objective = lm_losses(model, batch, z_loss=1e-2)
        logits = model(*batch.inputs)
    keep = batch.targets != -100
    log_z = torch.log(torch.exp(logits[keep]).sum(-1))
    ce_direct = -(logits[keep].log_softmax(-1).gather(1, batch.targets[keep][:, None])).mean()
    assert float(ce) == pytest.approx(float(ce_direct), rel=1e-12)
    assert float(objective - ce) == pytest.approx(1e-2 * float((log_z**2).mean()), rel=1e-12)
    assert float(objective - ce) > 1e-3  # the term is there, and large enough to matter here
    with torch.no_grad():
        ce0, obj0 = lm_losses(model, batch)
    assert torch.equal(ce0, obj0)  # without z-loss the objective is the cross-entropy
    # the Trainer backpropagates the objective and returns the cross-entropy
    grads = {}
    for coef in (0.0, 1e-2):
        torch.manual_seed(0)
        m = build_model(ModelConfig(arch="decoder", placement="pre-ln", **SMALL)).double()
        loss = Trainer(m, z_loss=coef).step(batch, update=False)
        assert float(loss) == pytest.approx(float(ce), rel=1e-12)
        grads[coef] = m.output_projection.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[1e-2])
    with pytest.raises(ValueError, match="z_loss"):
        Trainer(model, z_loss=-1.0)


def test_dyt_starts_at_alpha_half_and_refuses_another_norm():
    model = build_model(ModelConfig(arch="decoder", placement="dyt", qk_norm=True, **SMALL))
    norms = [m for m in model.modules() if type(m).__name__ == "DynamicTanh"]
    # per block 2 sublayer norms + q and k norms of the attention, and the final norm
    assert len(norms) == 4 * SMALL["depth"] + 1 and all(float(n.alpha) == 0.5 for n in norms)
    assert not any(isinstance(m, (torch.nn.LayerNorm,)) for m in model.modules())
    with pytest.raises(ConfigError, match="placement 'dyt' makes every norm dyt"):
        ModelConfig(placement="dyt", norm="rmsnorm")


def test_dyt_llama_starts_alpha_per_position_without_bias():
    """The LLaMA recipe (jiachenzhu/DyT other_tasks/LLaMA, 7B flags): attention 0.8, FFN 0.2, final 0.2."""
    model = build_model(ModelConfig(arch="decoder", placement="dyt-llama", **SMALL))
    stack = model.decoder
    assert [float(b.self_attn.norm.alpha) for b in stack.layers] == pytest.approx(
        [0.8] * SMALL["depth"]
    )
    assert [float(b.ffn.norm.alpha) for b in stack.layers] == pytest.approx([0.2] * SMALL["depth"])
    assert float(stack.final_norm.alpha) == pytest.approx(0.2)
    assert all(m.bias is None for m in model.modules() if type(m).__name__ == "DynamicTanh")


def hand_ngpt_attention(attn, h, memory=None):
    """nGPT's attention (NVIDIA/ngpt model.py) in float64: no biases; per head q and k unit vectors
    times s_qk (one, stored at d^-1/2, used times d^1/2), softmax(q k^T * sqrt(head_dim) + causal)."""
    B, T, C = h.shape
    src = h if memory is None else memory
    H = attn.heads
    Dh = C // H
    assert all(lin.bias is None for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj))
    assert attn.k_norm is attn.q_norm  # one s_qk for q and k, as the reference's sqk

    def heads(t):
        return t.view(B, -1, H, Dh).transpose(1, 2)

    sqk = attn.q_norm.s.stored * math.sqrt(C)  # (H, 1, Dh)
    q = l2(heads(h @ attn.q_proj.weight.T)) * sqk
    k = l2(heads(src @ attn.k_proj.weight.T)) * sqk
    v = heads(src @ attn.v_proj.weight.T)
    scores = q @ k.transpose(-1, -2) * math.sqrt(Dh)
    if attn.causal and memory is None:
        scores = scores.masked_fill(torch.ones(T, k.shape[2], dtype=torch.bool).triu(1), -math.inf)
    y = torch.softmax(scores, -1) @ v
    return y.transpose(1, 2).reshape(B, T, C) @ attn.out_proj.weight.T


def test_ngpt_attention_ffn_and_logits_equal_a_hand_computation():
    model = tiny("ngpt", "seq2seq")  # perturbs alpha, s_qk, s_u and s_z
    blk = model.decoder.layers[1]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 16, dtype=torch.float64, generator=g)
    memory = torch.randn(2, 7, 16, dtype=torch.float64, generator=g)
    src, tgt = torch.randint(1, 50, (2, 6)), torch.randint(1, 50, (2, 5))
    with torch.no_grad():
        for attn, mem in ((blk.self_attn, None), (blk.cross_attn, memory)):
            assert close(attn.branch(h, mem), hand_ngpt_attention(attn, h, mem))
        ffn = blk.ffn  # ReLU FFN with s_u (stored 1, used times sqrt(d)) before the ReLU
        assert ffn.fc1.bias is None and ffn.fc2.bias is None
        u = (h @ ffn.fc1.weight.T) * ffn.hidden_scale.stored * math.sqrt(16)
        assert close(ffn.branch(h, None), torch.relu(u) @ ffn.fc2.weight.T)
        # logits s_z * (W h), s_z stored at d^-1/2 and used times d^1/2
        out = model.decoder(tgt, model.encoder(src))
        sz = model.output_projection.sz.stored * math.sqrt(16)
        assert close(model(src, tgt), (out @ model.decoder.embed_tokens.weight.T) * sz)
        assert torch.allclose(out.norm(dim=-1), torch.ones(2, 5, dtype=torch.float64))


def ngpt_row_norms(model):
    """Norm of every row along the embedding dimension of nGPT's matrices, as train.py's
    normalize_matrices: dim 1 of q, k, v, fc1, embeddings and output projection; dim 0 of out, fc2."""
    norms = []
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "fc1.weight")):
            norms.append(p.norm(dim=1))
        elif name.endswith(("embed_tokens.weight", "output_projection.weight")):
            norms.append(p.norm(dim=1))
        elif name.endswith(("out_proj.weight", "fc2.weight")):
            norms.append(p.norm(dim=0))
        else:  # alpha, s_qk, s_u, s_z
            assert name.endswith(".stored"), name
    return torch.cat(norms).detach()


@pytest.mark.parametrize("tie", [True, False])
def test_ngpt_weights_are_unit_rows_at_init_and_after_every_trainer_step(tie):
    import copy

    from residual_probe.data import BatchSource
    from residual_probe.training import BETAS, Trainer

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="decoder", placement="ngpt", tie_embeddings=tie, **SMALL))
    assert torch.allclose(ngpt_row_norms(model), torch.tensor(1.0), atol=1e-6)
    raw = copy.deepcopy(model)
    batch = BatchSource("decoder", 3, 8, SMALL["vocab_size"], seed=0).next()
    Trainer(model, lr=1e-2).step(batch)
    # the same Adam step without the hook moves the rows off the sphere ...
    opt = torch.optim.Adam(raw.parameters(), lr=1e-2, betas=BETAS, eps=1e-8)
    torch.nn.functional.cross_entropy(
        raw(*batch.inputs).flatten(0, 1), batch.targets.flatten()
    ).backward()
    opt.step()
    assert (ngpt_row_norms(raw) - 1).abs().max() > 1e-3
    # ... and the Trainer's step is that step, renormalized
    assert torch.allclose(ngpt_row_norms(model), torch.tensor(1.0), atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), raw.parameters(), strict=True):
        if p.dim() == 2:
            dim = 0 if name.endswith(("out_proj.weight", "fc2.weight")) else 1
            q = q / q.norm(dim=dim, keepdim=True)
        assert torch.allclose(p, q, atol=1e-6), name


def test_ngpt_refuses_xiong_init_and_counts_its_scales():
    with pytest.raises(
        ConfigError, match="init: placement 'ngpt' starts from fairseq, not 'xiong'"
    ):
        ModelConfig(placement="ngpt", init="xiong")
    d, f, V, N = SMALL["d_model"], SMALL["ffn"], SMALL["vocab_size"], SMALL["depth"]
    model = build_model(ModelConfig(arch="decoder", placement="ngpt", **SMALL))
    n = sum(p.numel() for p in model.parameters())
    # per block: 4 d x d attention maps, fc1 and fc2 (no biases), alpha_A and alpha_M (d each),
    # s_qk (d: heads x head_dim), s_u (ffn); the tied embedding and s_z (vocab)
    assert n == N * (4 * d * d + 2 * d * f + 2 * d + d + f) + V * d + V


@pytest.mark.parametrize("arch,N,M", [("encoder", 6, 0), ("decoder", 0, 6), ("seq2seq", 6, 12)])
def test_tfixup_constants(arch, N, M):
    """The repository's expressions (layer6ai-labs/T-Fixup fairseq/modules/transformer_layer.py and
    fairseq/models/transformer.py): encoder layers 0.67 * N ** (-1/4), decoder layers
    (9 * M) ** (-1/4), embeddings (9 * L) ** (-1/4) with their stack's L."""
    cfg = ModelConfig(
        arch=arch,
        placement="tfixup",
        depth=N or M,
        decoder_depth=M if arch == "seq2seq" else None,
        **{k: v for k, v in SMALL.items() if k != "depth"},
    )
    if N:
        assert tfixup_constants(cfg, "encoder") == pytest.approx(
            (0.67 * N**-0.25, (9 * N) ** -0.25)
        )
        assert tfixup_constants(cfg, "encoder")[0] == pytest.approx(0.42809, abs=1e-5)  # N = 6
    if M:
        assert tfixup_constants(cfg, "decoder") == pytest.approx(((9 * M) ** -0.25,) * 2)
    if M == 6:
        assert tfixup_constants(cfg, "decoder")[0] == pytest.approx(0.36889, abs=1e-5)


@pytest.mark.parametrize("arch,share", [("decoder", False), ("encoder", False), ("seq2seq", True)])
def test_tfixup_init_scales_v_out_fc1_fc2_and_the_embeddings(arch, share):
    sizes = dict(SMALL, depth=4, decoder_depth=6 if arch == "seq2seq" else None)
    torch.manual_seed(0)
    post = build_model(
        ModelConfig(arch=arch, placement="post-ln", share_all_embeddings=share, **sizes)
    )
    torch.manual_seed(0)
    fix = build_model(
        ModelConfig(arch=arch, placement="tfixup", share_all_embeddings=share, **sizes)
    )
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in fix.modules())
    ref = dict(post.named_parameters())
    L = {"encoder": 4, "decoder": 6 if arch == "seq2seq" else 4}
    for name, p in fix.named_parameters():
        role = name.split(".")[0]
        block = 0.67 * L[role] ** -0.25 if role == "encoder" else (9 * L[role]) ** -0.25
        if name.endswith("embed_tokens.weight"):  # a shared table: scaled once, by the encoder
            assert torch.allclose(p, (9 * L[role]) ** -0.25 * ref[name]), name
        elif name.endswith("out_proj.weight"):  # Xavier already; scaled
            assert torch.allclose(p, block * ref[name]), name
        elif name.endswith(("v_proj.weight", "fc1.weight", "fc2.weight")):  # redrawn Xavier, scaled
            bound = block * math.sqrt(6 / sum(p.shape))
            assert 0.97 * bound < p.abs().max() <= bound, name
        elif name.endswith(("fc1.bias", "fc2.bias")):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:  # q, k, biases of q, k, v, out: the model's own init
            assert torch.equal(p, ref[name]), name
    if share:
        assert fix.encoder.embed_tokens is fix.decoder.embed_tokens


@pytest.mark.parametrize("arch", ["decoder", "encoder", "seq2seq"])
def test_admin_omegas_are_the_profiled_variances(arch):
    """An independent run of Transformer-Clinic's profiling on the same batch: r = 1 at each
    stack's start; per sublayer in order omega_i = r, r <- sqrt(Var(x_i omega_i) + Var(F_i(x_i))),
    Var over every entry; x_{i+1} = LN(x_i omega_i + F_i(x_i))."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, placement="admin", **SMALL)).double()
    tokens = admin_profile_tokens(model.cfg)
    assert tokens["decoder"].shape == (8, 32)

    def var(t):
        return ((t - t.mean()) ** 2).mean()

    memory, omegas = None, []
    with torch.no_grad():
        for role, stack in model.stacks():
            x, r = stack.embed(tokens[role]), 1.0
            for blk in stack.layers:
                for s in blk.sublayers():
                    omega = torch.full((16,), r, dtype=torch.float64)
                    assert torch.allclose(s.omega, omega, rtol=1e-5), (role, blk.k)
                    b = s(x, memory) if s is blk.cross_attn else s(x)
                    r = math.sqrt(var(x * omega) + var(b))
                    x = s.norm(x * omega + b)
                    omegas.append(r)
            memory = x
    assert omegas[0] > 1.1  # non-trivial: the second sublayer's omega


def test_admin_profiling_leaves_the_global_generator_alone():
    def draw_after(placement):
        torch.manual_seed(0)
        build_model(ModelConfig(arch="seq2seq", placement=placement, dropout=0.3, **SMALL))
        return torch.rand(3)

    # same weights drawn; the profiling's dropout masks come from a forked generator
    assert torch.equal(draw_after("admin"), draw_after("post-ln"))
