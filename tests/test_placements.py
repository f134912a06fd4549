"""Every placement against DESIGN.md's equations, block by block, in float64.

The reference formulas below are written out independently of placements.py: each one
recomputes a block's output from the block's own sublayers (F) and norms.
"""

import math

import pytest
import torch

from residual_probe.models import PLACEMENTS, ConfigError, ModelConfig, build_model
from residual_probe.models.placements import deepnorm_constants

SMALL = dict(d_model=16, heads=2, ffn=32, depth=4, vocab_size=50, max_len=64)


def tiny(placement, arch="decoder", **kw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, placement=placement, **{**SMALL, **kw})).double()
    # Non-trivial norm affines and ReZero gates so that every term of each formula matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("gate"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def reference_block(placement, blk, x, memory, depth, mix_ratio=0.25):
    """DESIGN.md's per-block formula, spelled out for each placement."""
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
    if placement == "residual":
        x, d = x
        for f, s in fs:
            b = f(x)
            d = d + b
            x = s.norm(x + b)
        return x, d
    for f, s in fs:
        if placement == "post-ln" or (placement == "mix-ln" and k < math.ceil(mix_ratio * depth)):
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
        else:
            raise AssertionError(placement)
    return x


def close(a, b):
    if isinstance(a, tuple):
        return all(close(u, v) for u, v in zip(a, b, strict=True))
    return torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["decoder", "seq2seq"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_every_block_matches_its_equation(placement, arch):
    model = tiny(placement, arch)
    tokens = torch.randint(1, 50, (2, 7))
    stack = model.decoder
    memory = model.encoder(tokens) if arch == "seq2seq" else None
    state = stack.placement.begin(stack.embed(tokens), stack)
    for blk in stack.layers:
        expected = reference_block(placement, blk, state, memory, depth=len(stack.layers))
        state = blk(state, memory)
        assert close(state, expected), f"{placement} block {blk.k}"


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_stack_start_and_end(placement):
    """Embedding -> begin -> blocks -> end, with DESIGN.md's end-of-stack column."""
    model = tiny(placement)
    stack = model.decoder
    tokens = torch.randint(1, 50, (2, 7))
    x0 = stack.embed(tokens)
    x = stack.embed_norm(x0) if placement == "peri-ln" else x0
    state = (x, 1.0 * x0) if placement == "residual" else x
    for blk in stack.layers:
        state = blk(state)
    if placement == "residual":
        x, d = state
        expected = 1.0 * x + torch.nn.functional.layer_norm(
            d, (16,), stack.final_norm.weight, stack.final_norm.bias, eps=1e-7)
    elif placement in ("pre-ln", "sandwich", "peri-ln", "mix-ln", "lns"):
        expected = stack.final_norm(state)
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
    cfg = ModelConfig(arch=arch, placement="deepnorm", depth=depth, decoder_depth=M if arch == "seq2seq" else None, **{k: v for k, v in SMALL.items() if k != "depth"})
    if arch == "encoder":
        assert deepnorm_constants(cfg, "encoder") == pytest.approx(((2 * N) ** 0.25, (8 * N) ** -0.25))
    elif arch == "decoder":
        assert deepnorm_constants(cfg, "decoder") == pytest.approx(((2 * M) ** 0.25, (8 * M) ** -0.25))
    else:
        assert deepnorm_constants(cfg, "encoder") == pytest.approx((0.81 * (N**4 * M) ** (1 / 16), 0.87 * (N**4 * M) ** (-1 / 16)))
        assert deepnorm_constants(cfg, "decoder") == pytest.approx(((3 * M) ** 0.25, (12 * M) ** -0.25))


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


@pytest.mark.parametrize("ratio,depth,switch", [(0.25, 8, 2), (0.25, 6, 2), (0.5, 5, 3), (0.0, 4, 0), (1.0, 4, 4)])
def test_mix_ln_switch_point(ratio, depth, switch):
    model = tiny("mix-ln", depth=depth, mix_ratio=ratio)
    assert model.decoder.placement.switch == switch == math.ceil(ratio * depth)
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
    from residual_probe.data import BatchSource

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="decoder", placement=placement, d_model=32, heads=2, ffn=64, depth=3, vocab_size=20))
    batch = BatchSource("decoder", 4, 12, 20, seed=0).next()  # one fixed batch: the loss must fall on it
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss():
        return torch.nn.functional.cross_entropy(model(*batch.inputs).flatten(0, 1), batch.targets.flatten())

    first = float(loss().detach())
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < 0.9 * first


def test_config_rejects_unknown_keys_and_conflicts():
    with pytest.raises(ConfigError, match="unknown config keys: colour"):
        ModelConfig.from_dict({"colour": 1})
    with pytest.raises(ConfigError, match="placement: unknown 'pre_ln'; choose one of post-ln, pre-ln"):
        ModelConfig(placement="pre_ln")
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=10, heads=3)
    with pytest.raises(ConfigError, match="depth: must be a positive integer"):
        ModelConfig(depth=0)
    with pytest.raises(ConfigError, match="decoder_depth: only for arch 'seq2seq'"):
        ModelConfig(arch="decoder", decoder_depth=3)


def test_config_json_round_trip():
    cfg = ModelConfig(arch="seq2seq", placement="residual", depth=3, decoder_depth=5, alpha=0.5, norm="rmsnorm")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    model = build_model(cfg)
    assert len(model.encoder.layers) == 3 and len(model.decoder.layers) == 5
