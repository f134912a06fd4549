"""The probe on residual-probe's own models: every quantity against a direct float64 computation.

The reference runs the stacks by hand (embedding, blocks, end of stack), keeps every block's
input and output with retain_grad, and computes each metric with explicit per-token formulas;
it shares no code with the probe's hooks.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_values_close, keyed, tiny_model

from residual_probe.models import build_model
from residual_probe.probe import DiscoveryError, Probe, ProbeError
from residual_probe.probe.records import read_sink

SIZES = dict(depth=3, d_model=16, heads=2, ffn=32, vocab_size=23, max_len=64)
FORWARD = (
    "cos_adjacent",
    "relative_update",
    "norm_sq_per_dim",
    "ln_update",
    "block_influence",
    "angular_distance",
    "norm_sq_per_dim_max",
)
# attn_logits' and output_logits' rows: against eager twins in tests/test_attention_probe.py
ATTENTION = (
    "attn_logit_max",
    "attn_entropy",
    "attn_entropy_min",
    "logit_z_mean",
    "logit_z_max",
    "logit_max",
)


def make(arch, placement, seed=0, **kw):
    return tiny_model(placement, arch, seed, **{**SIZES, **kw}).double()


def inputs(arch, batch=3, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = lambda: torch.randint(1, SIZES["vocab_size"], (batch, T), generator=g)  # noqa: E731
    x = (tok(), tok()) if arch == "seq2seq" else (tok(),)
    return x, torch.randint(0, SIZES["vocab_size"], (batch, T), generator=g)


def loss_of(logits, targets, scale=1.0):
    return scale * F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---- the direct computation ----------------------------------------------------------------


def manual_forward(model, inp):
    """Transformer.forward by hand; returns logits and {(stack, k): (input streams, output streams)}."""
    cap = {}

    def run(role, stack, tokens, memory=None):
        x = stack.placement.begin(stack.embed(tokens), stack)
        for k, blk in enumerate(stack.layers):
            prev = x if isinstance(x, tuple) else (x,)
            x = blk(x, memory)
            cur = x if isinstance(x, tuple) else (x,)
            for t in cur:
                t.retain_grad()
            cap[(role, k)] = (prev, cur)
        return stack.placement.end(x, stack)

    if model.cfg.arch == "seq2seq":
        h = run("decoder", model.decoder, inp[1], run("encoder", model.encoder, inp[0]))
    else:
        h = run(model.stacks()[0][0], model.stacks()[0][1], inp[0])
    return model.output_projection(h), cap


def naive_stats(prev, cur, eps=1e-5):
    a, b = prev.detach().reshape(-1, prev.shape[-1]), cur.detach().reshape(-1, cur.shape[-1])
    cos = torch.stack([a[t] @ b[t] / (a[t].norm() * b[t].norm()) for t in range(len(a))])
    rel = torch.stack([(b[t] - a[t]).norm() / a[t].norm() for t in range(len(a))])

    def ln(v):
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(
            v.var(-1, unbiased=False, keepdim=True) + eps
        )

    c = float(cos.mean())
    return {
        "cos_adjacent": c,
        "relative_update": float(rel.mean()),
        "norm_sq_per_dim": float((b**2).sum(-1).mean() / b.shape[-1]),
        "norm_sq_per_dim_max": max(float(b[t] @ b[t]) / b.shape[-1] for t in range(len(b))),
        "ln_update": float((ln(b) - ln(a)).abs().mean()),
        "block_influence": 1 - c,  # of the mean cosine (ShortGPT)
        "angular_distance": float(
            sum(math.acos(max(-1.0, min(1.0, float(x)))) for x in cos) / len(cos)
        )
        / math.pi,
    }  # angular distance: per token, then averaged (Gromov et al.), not arccos of the mean cosine


def naive_act(grad):
    g = grad.reshape(-1, grad.shape[-1])
    return math.sqrt(sum(float(g[t] @ g[t]) for t in range(len(g))) / len(g))


def param_norm(params):
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))


def reference(model, inp, targets):
    """Expected rows {(stack, layer, sublayer, stream, metric): value} for one step."""
    model.zero_grad(set_to_none=True)
    logits, cap = manual_forward(model, inp)
    loss_of(logits, targets).backward()
    ref = {}
    for role, stack in model.stacks():
        streams = stack.placement.streams
        for k, blk in enumerate(stack.layers):
            prev, cur = cap[(role, k)]
            for s, p, c in zip(streams, prev, cur):
                for metric, v in naive_stats(p, c).items():
                    ref[(role, k, "block", s, metric)] = v
                ref[(role, k, "block", s, "act_grad_norm")] = naive_act(c.grad)
            ref[(role, k, "block", "-", "param_grad_norm")] = param_norm(blk.parameters())
            for name in ("self_attn", "cross_attn", "ffn"):
                if getattr(blk, name) is not None:
                    ref[(role, k, name, "-", "param_grad_norm")] = param_norm(
                        getattr(blk, name).parameters()
                    )
            named = dict(blk.named_parameters())
            is_norm = lambda n: ".norm." in n or ".out_norm." in n  # noqa: E731
            norms = [p for n, p in named.items() if is_norm(n)]
            attn = [p for n, p in named.items() if "attn." in n and not is_norm(n)]
            ffn = [p for n, p in named.items() if n.startswith("ffn.") and not is_norm(n)]
            for g, ps in (("attention", attn), ("ffn", ffn), ("norm", norms)):
                if ps:
                    ref[(role, k, f"group:{g}", "-", "param_grad_norm")] = param_norm(ps)
            if "gate" in named:
                ref[(role, k, "group:other", "-", "param_grad_norm")] = param_norm([named["gate"]])
        last = len(stack.layers) - 1
        ref[(role, last, "ffn.fc2", "-", "w2_grad_norm")] = float(
            stack.layers[last].ffn.fc2.weight.grad.norm()
        )
    # the parts outside the blocks, and the total over every parameter once (clip_grad_norm_'s norm)
    stacks = [s for _, s in model.stacks()]
    parts = {
        "embedding": {p for s in stacks for p in s.embed.parameters()},
        "embedding_norm": {  # Peri-LN's LN on the embedding
            p for s in stacks if s.embed_norm is not None for p in s.embed_norm.parameters()
        },
        "final_norm": {
            p for s in stacks if s.final_norm is not None for p in s.final_norm.parameters()
        },
        "head": set(model.output_projection.parameters())
        - {p for s in stacks for p in s.embed.parameters()},
    }
    for part, ps in parts.items():
        if ps:
            ref[("model", -1, part, "-", "param_grad_norm")] = param_norm(ps)
    ref[("model", -1, "total", "-", "param_grad_norm")] = param_norm(model.parameters())
    model.zero_grad(set_to_none=True)
    return ref


def probed(model, inp, targets, **kw):
    probe = Probe(model, **kw)
    with probe:
        loss_of(model(*inp), targets).backward()
        rows = probe.step()
    model.zero_grad(set_to_none=True)
    return probe, keyed(rows, with_step=False)


CASES = [
    ("decoder", "pre-ln"),
    ("decoder", "post-ln"),
    ("encoder", "sandwich"),
    ("seq2seq", "residual"),
    ("seq2seq", "deepnorm"),
    ("decoder", "rezero"),
    ("decoder", "b2t"),
]


@pytest.mark.parametrize("arch,placement", CASES)
def test_every_quantity_equals_direct_float64(arch, placement):
    model = make(arch, placement)
    if placement == "rezero":  # gates are 0 at init: open them so the blocks act
        with torch.no_grad():
            for _, stack in model.stacks():
                for blk in stack.layers:
                    blk.gate.fill_(0.3)
    inp, targets = inputs(arch)
    ref = reference(model, inp, targets)
    _, got = probed(model, inp, targets)
    got.pop(("-", -1, "-", "-", "nonfinite_count"))
    assert {k[-1] for k in got} >= set(ATTENTION)
    got = {k: v for k, v in got.items() if k[-1] not in ATTENTION}
    assert_values_close(got, ref)
    if placement == "residual":  # both streams recorded, and they differ
        assert (
            got[("decoder", 0, "block", "d", "cos_adjacent")]
            != got[("decoder", 0, "block", "x", "cos_adjacent")]
        )


def test_micro_batches_pool_to_the_full_batch():
    """Two half batches (loss / 2 each) then step() give the rows of one full batch."""
    model = make("decoder", "pre-ln")
    (tok,), targets = inputs("decoder", batch=4)
    _, full = probed(model, (tok,), targets, subsample_tokens=8)
    probe = Probe(model, subsample_tokens=8)
    with probe:
        for half in (slice(0, 2), slice(2, 4)):
            loss_of(model(tok[half]), targets[half], scale=0.5).backward()
        rows = probe.step()
    got = keyed(rows, with_step=False)
    assert_values_close(got, full)


def test_subsample_is_seeded_and_takes_the_same_tokens_of_every_layer():
    model = make("seq2seq", "residual")
    inp, targets = inputs("seq2seq", batch=3, T=5)
    _, cap = manual_forward(model, inp)
    p1, _ = probed(model, inp, targets, subsample_tokens=6, seed=7)
    p2, _ = probed(model, inp, targets, subsample_tokens=6, seed=7)
    p3, _ = probed(model, inp, targets, subsample_tokens=6, seed=8)
    sub = p1.subsamples()
    assert set(sub) == {("encoder", "x"), ("encoder", "d"), ("decoder", "x"), ("decoder", "d")}
    for key, t in sub.items():
        assert t.shape == (SIZES["depth"] + 1, 6, 16) and t.dtype == torch.float32
        assert torch.equal(t, p2.subsamples()[key])
        assert not torch.equal(t, p3.subsamples()[key])
        stack, stream = key
        si = ("x", "d").index(stream)
        layers = [cap[(stack, 0)][0][si]] + [cap[(stack, k)][1][si] for k in range(SIZES["depth"])]
        full = [h.detach().reshape(-1, 16).float() for h in layers]
        # the same token positions in every layer: each kept token's path through all layers
        # is some token's path (matching on the joint path: equal embeddings can repeat)
        path, kept = torch.cat(full, dim=1), torch.cat(list(t), dim=1)  # (tokens, (L+1) * d)
        assert torch.cdist(kept, path).min(dim=1).values.max() < 1e-6
    assert p1.subsample_step == 0


def test_subsample_is_bounded_by_the_tokens_there_are():
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder", batch=2, T=3)
    probe, _ = probed(model, inp, targets, subsample_tokens=1000)
    got = probe.subsamples()[("decoder", "x")]
    assert got.shape == (SIZES["depth"] + 1, 6, 16)
    _, cap = manual_forward(model, inp)  # every token kept: the states themselves, in token order
    layers = [cap[("decoder", 0)][0][0]] + [
        cap[("decoder", k)][1][0] for k in range(SIZES["depth"])
    ]
    assert torch.equal(got, torch.stack([h.detach().reshape(-1, 16).float() for h in layers]))


def test_subsample_buffers_are_reused_and_what_subsamples_returns_is_not_overwritten():
    """The probe fills the same two buffers step after step (no fresh allocation per step), and
    the tensors a caller got from subsamples() keep that step's values after later steps."""
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder", batch=2, T=3)
    probe = Probe(model, quantities=("subsample",), subsample_tokens=4)
    got, snaps, buffers = [], [], []
    with probe:
        for _ in range(4):
            model(*inp)  # the same input each step: the same rows, drawn at other positions
            probe.step()
            got.append(probe.subsamples()[("decoder", "x")])
            snaps.append(got[-1].clone())
            buffers.append(probe.quantity("subsample").last[("decoder", "x")].data_ptr())
    assert len(set(buffers)) == 2  # two buffers, alternating
    _, cap = manual_forward(model, inp)
    full = (
        torch.cat(
            [cap[("decoder", 0)][0][0].reshape(-1, 16)]
            + [cap[("decoder", k)][1][0].reshape(-1, 16) for k in range(SIZES["depth"])],
            1,
        )
        .detach()
        .float()
    )
    for (
        t
    ) in got:  # each copy is still a set of real token paths (not a later step's overwrite of it)
        assert torch.cdist(torch.cat(list(t), dim=1), full).min(dim=1).values.max() < 1e-5
    assert any(not torch.equal(got[0], t) for t in got[1:])  # other positions on other steps
    assert all(
        torch.equal(t, snap) for t, snap in zip(got, snaps)
    )  # not overwritten by later draws


def test_schedules_every_steps_and_per_quantity():
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")

    def run(probe, n=6):
        with probe:
            for _ in range(n):
                loss_of(model(*inp), targets).backward()
                probe.step()
                model.zero_grad(set_to_none=True)
        by_step = {}
        for r in probe.rows():
            by_step.setdefault(r["step"], set()).add(r["metric"])
        return by_step

    assert sorted(run(Probe(model, quantities=("param_grad_norm",), every=3))) == [0, 3]
    assert sorted(run(Probe(model, quantities=("act_grad_norm",), steps=[1, 4]))) == [1, 4]
    steps = run(
        Probe(
            model,
            quantities={
                "param_grad_norm": 2,
                "forward_stats": [1],
                "w2_grad_norm": lambda s: s == 5,
            },
        )
    )
    assert steps[0] == steps[2] == steps[4] == {"param_grad_norm", "nonfinite_count"}
    assert steps[1] == set(FORWARD) | {"nonfinite_count"}
    assert steps[5] == {"w2_grad_norm", "nonfinite_count"}
    assert 3 not in steps


def test_unscheduled_steps_register_nothing():
    """A skipped step's backward leaves nothing held (a gradient hook that fired would hold the
    block's gradient until `step()`); on a scheduled step every block's hook fires."""
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    probe = Probe(model, every=2, start_step=1, quantities=("act_grad_norm",))
    with probe:
        loss = loss_of(model(*inp), targets)
        assert probe.state_bytes() == 0
        loss.backward()
        assert probe.state_bytes() == 0 and probe.step() == []
        loss_of(model(*inp), targets).backward()
        assert probe.state_bytes() > 0  # the gradients the hooks took, held until step()
        rows = probe.step()
    assert {r["step"] for r in rows} == {2}
    assert sorted(r["layer"] for r in rows if r["value"] > 0) == list(range(SIZES["depth"]))


def test_forward_stats_under_no_grad():
    model = make("decoder", "post-ln")
    inp, targets = inputs("decoder")
    ref = reference(model, inp, targets)
    probe = Probe(model, quantities=("forward_stats", "act_grad_norm"), include_eval=True)
    with probe, torch.no_grad():
        model(*inp)
        rows = probe.step()
    metrics = {r["metric"] for r in rows}
    assert "act_grad_norm" not in metrics and set(FORWARD) <= metrics
    for r in rows:
        if r["metric"] in FORWARD:
            assert r["value"] == pytest.approx(
                ref[(r["stack"], r["layer"], "block", "x", r["metric"])], rel=1e-9
            )


def test_activation_checkpoint_recomputation_is_not_counted_twice():
    from torch.utils.checkpoint import checkpoint

    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    ref = reference(model, inp, targets)
    for blk in model.decoder.layers:
        blk.forward = (
            lambda f: lambda x, memory=None: checkpoint(f, x, memory, use_reentrant=False)
        )(blk.forward)
    _, got = probed(model, inp, targets)
    assert_values_close(got, ref, same_keys=False)


def test_nonfinite_values_are_recorded_and_counted_not_raised():
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    with torch.no_grad():
        model.decoder.layers[1].ffn.fc1.weight[0, 0] = float("nan")
    probe, got = probed(model, inp, targets)
    assert math.isnan(got[("decoder", 1, "block", "-", "param_grad_norm")])
    assert math.isnan(got[("decoder", 1, "block", "x", "cos_adjacent")])
    bad = sum(1 for k, v in got.items() if k[-1] != "nonfinite_count" and not math.isfinite(v))
    assert bad > 10 and got[("-", -1, "-", "-", "nonfinite_count")] == bad == probe.nonfinite_total


# ---- detach: nothing left behind ------------------------------------------------------------


def hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_detach_restores_the_model_exactly():
    model = make("seq2seq", "residual")
    inp, _ = inputs("seq2seq")
    before = model(*inp)
    probe = Probe(model)
    hooks = 2 * SIZES["depth"] + 1  # each block's, and the output head's (output_logits)
    observed = lambda: sum("observer" in vars(m) for m in model.modules())  # noqa: E731
    with probe:
        during = model(*inp)
        assert hook_count(model) == hooks
        assert observed() == 3 * SIZES["depth"]  # every attention's observer (attn_logits)
    after = model(*inp)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert hook_count(model) == 0 and observed() == 0
    probe.attach()  # explicit attach/detach too
    assert hook_count(model) == hooks
    probe.detach()
    assert hook_count(model) == 0 and observed() == 0


@pytest.fixture
def one_thread():
    """Tiny ops on a busy machine: a second intra-op thread only adds spin-wait latency."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_no_references_or_memory_remain_across_300_steps(one_thread):
    """Every quantity records every step: one tensor kept per step would add 290 by the end."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = build_model(
        arch="decoder", placement="residual", depth=2, d_model=8, heads=2, ffn=8, vocab_size=11
    )
    tok = torch.randint(1, 11, (2, 4))

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    probe = Probe(model, keep_rows=False, subsample_tokens=4)
    with probe:
        for step in range(300):
            model(tok).square().mean().backward()
            probe.step()
            model.zero_grad(set_to_none=True)
            if step == 9:
                early = live_tensors()
    assert live_tensors() <= early  # nothing grows with the number of steps
    ref = weakref.ref(probe)
    del probe
    gc.collect()
    assert ref() is None and hook_count(model) == 0
    assert all(not p._backward_hooks for p in model.parameters() if p._backward_hooks is not None)


def test_detach_mid_step_drops_pending_gradient_hooks():
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    probe = Probe(model, quantities=("act_grad_norm",))
    probe.attach()
    loss = loss_of(model(*inp), targets)
    probe.detach()
    loss.backward()  # the hooks registered before detach must not fire into the probe
    assert probe.state_bytes() == 0 and probe.step() == []


# ---- evaluation forwards, pausing --------------------------------------------------------


def one_step_with(model, inp, targets, between, **kw):
    """Rows of one training step with `between(probe)` run after its forward."""
    probe = Probe(model, subsample_tokens=8, **kw)
    with probe:
        loss = loss_of(model(*inp), targets)
        between(probe)
        loss.backward()
        rows = probe.step()
    model.zero_grad(set_to_none=True)
    return probe, keyed(rows, with_step=False)


def test_eval_forwards_are_not_pooled_into_the_training_step():
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    other, _ = inputs("decoder", seed=5)
    ref = reference(model, inp, targets)

    def validate(probe):
        model.eval()
        with torch.no_grad():
            model(*other)
        model.train()

    with pytest.warns(UserWarning, match="eval mode or under no_grad were not recorded"):
        probe, got = one_step_with(model, inp, targets, validate)
    assert_values_close(got, ref, same_keys=False)
    plain, _ = one_step_with(model, inp, targets, lambda p: None)
    # the subsample is the training batch's, not validation's
    for key, sub in plain.subsamples().items():
        assert torch.equal(probe.subsamples()[key], sub)

    def train_mode_no_grad(probe):
        # a training-mode module under no_grad is not a training forward either
        with torch.no_grad():
            model(*other)

    with pytest.warns(UserWarning, match="not recorded"):
        _, got = one_step_with(model, inp, targets, train_mode_no_grad)
    assert got[("decoder", 1, "block", "x", "cos_adjacent")] == pytest.approx(
        ref[("decoder", 1, "block", "x", "cos_adjacent")], rel=1e-9
    )


def test_paused_records_nothing_and_says_nothing():
    import warnings

    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    other, other_t = inputs("decoder", seed=5)
    ref = reference(model, inp, targets)

    def paused_training_forward(probe):
        with probe.paused():  # even a training-mode forward with grad is ignored while paused
            loss_of(model(*other), other_t).backward()
        model.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, got = one_step_with(
            model,
            inp,
            targets,
            paused_training_forward,
            quantities=("forward_stats", "act_grad_norm"),
        )
    checked = {k: v for k, v in ref.items() if k[-1] in FORWARD or k[-1] == "act_grad_norm"}
    assert_values_close(got, checked, same_keys=False)


def test_include_eval_records_eval_forwards():
    model = make("decoder", "post-ln")
    inp, targets = inputs("decoder")
    ref = reference(model, inp, targets)
    model.eval()
    with Probe(model, quantities=("forward_stats",), include_eval=True) as probe, torch.no_grad():
        model(*inp)
        rows = probe.step()
    model.train()
    assert {r["metric"] for r in rows} >= set(FORWARD)
    for r in rows:
        if r["metric"] in FORWARD:
            assert r["value"] == pytest.approx(
                ref[(r["stack"], r["layer"], "block", "x", r["metric"])], rel=1e-9
            )


# ---- records on disk ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_sink_keeps_the_steps_before_a_crash(tmp_path, suffix):
    pd = pytest.importorskip("pandas")
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    path = tmp_path / f"rows.{suffix}"
    probe = Probe(model, quantities=("param_grad_norm", "forward_stats"), sink=str(path))
    with pytest.raises(RuntimeError, match="boom"):
        with probe:
            for step in range(10):
                if step == 4:
                    raise RuntimeError("boom")
                loss_of(model(*inp), targets).backward()
                probe.step()
    raw = (
        pd.read_csv(path) if suffix == "csv" else pd.read_json(path, lines=True)
    )  # one call either way
    assert sorted(raw["step"].unique()) == [0, 1, 2, 3]
    df = read_sink(path).frame()
    assert list(df.columns) == ["step", "stack", "layer", "sublayer", "stream", "metric", "value"]
    key = ["step", "stack", "layer", "sublayer", "stream", "metric"]
    df, mem = df.sort_values(key), pd.DataFrame(probe.rows()).sort_values(key)
    assert len(df) == len(mem)
    # the compact CSV keeps 7 significant digits, JSONL every bit
    assert df["value"].tolist() == pytest.approx(
        mem["value"].tolist(), rel=6e-7 if suffix == "csv" else 1e-12
    )


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_sink_is_appended_across_with_blocks_and_resumed_runs(tmp_path, suffix):
    pytest.importorskip("pandas")
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    path = tmp_path / f"rows.{suffix}"

    def steps(probe, n):
        with probe:
            for _ in range(n):
                loss_of(model(*inp), targets).backward()
                probe.step()
                model.zero_grad(set_to_none=True)

    probe = Probe(model, quantities=("param_grad_norm",), sink=str(path))
    steps(probe, 2)
    steps(probe, 3)  # the same probe, a second `with` block
    steps(
        Probe(model, quantities=("param_grad_norm",), sink=str(path), start_step=5), 2
    )  # a resumed run
    df = read_sink(path).frame()
    assert sorted(df["step"].unique()) == list(range(7))
    assert len(df) == 7 * len(probe.rows()) // 5


def test_sink_refuses_to_append_to_a_foreign_csv(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    with pytest.raises(ProbeError, match="not a probe CSV"):
        probed(model, inp, targets, quantities=("param_grad_norm",), sink=str(path))
    assert path.read_text() == "a,b\n1,2\n"


def test_sink_writes_nonfinite_values_readably(tmp_path):
    pd = pytest.importorskip("pandas")
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    with torch.no_grad():
        model.decoder.layers[0].ffn.fc2.bias[0] = float("inf")
    for suffix in ("csv", "jsonl"):
        path = tmp_path / f"bad.{suffix}"
        probed(model, inp, targets, quantities=("param_grad_norm",), sink=str(path))
        if suffix == "csv":
            cells = (
                path.read_text().replace("\n", ",").split(",")
            )  # an empty cell is "not recorded", not NaN
            assert {"nan", "inf", "-inf"} & set(cells) and pd.read_csv(path).shape[0] > 0
        df = read_sink(path).frame()
        assert df["value"].apply(lambda v: not math.isfinite(v)).sum() > 0


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(quantities=("param_grad_norm", "grad_norm")), "unknown quantity 'grad_norm'"),
        (dict(quantities=()), "at least one"),
        (dict(every=0), "every"),
        (dict(steps=["a"]), "steps"),
        (dict(steps=[-1]), "steps"),
        (dict(subsample_tokens=0), "subsample_tokens"),
        (dict(sink="rows.txt"), r"\.csv or \.jsonl"),
        (dict(sink="/nonexistent-dir/rows.csv"), "does not exist"),
    ],
)
def test_bad_settings_raise_one_line_probe_errors(kwargs, match):
    with pytest.raises(ProbeError, match=match) as err:
        Probe(make("decoder", "pre-ln"), **kwargs)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_not_a_module():
    with pytest.raises(ProbeError, match="nn.Module"):
        Probe(lambda x: x)


def test_model_without_blocks_says_what_was_tried_and_how_to_name_them():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(
        DiscoveryError, match=r"no residual blocks found in Sequential.*blocks='model\.layers\.\*'"
    ):
        Probe(model)


# ---- pieces: grouped norms, torch's own Transformer layers ---------------------------------


def test_grouped_norms_against_a_hand_reference():
    from residual_probe.probe import grouped_norms

    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64),
    )
    c = torch.randn(2, 2, generator=g).to(torch.float32)
    got = grouped_norms([[a, b], [b], [], [None, c], [a, c, a]])
    expect = [
        math.sqrt(float((a**2).sum() + (b**2).sum())),
        float(b.norm()),
        0.0,
        float(c.double().norm()),
        math.sqrt(float((a**2).sum()) + float((c.double() ** 2).sum())),
    ]  # a repeated: normed once
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expect, rel=1e-7)
    assert grouped_norms([[None], []]).tolist() == [0.0, 0.0]


def test_squared_norms_replan_on_layout_change_and_sparse_gradients_normed_densely():
    from residual_probe.probe.gradnorm import SquaredNorms

    emb = torch.nn.Embedding(10, 4, sparse=True).double()
    emb(torch.tensor([1, 3, 3])).square().sum().backward()
    assert emb.weight.grad.is_sparse
    a = torch.randn(3, dtype=torch.float64)
    sq = SquaredNorms()
    got = sq([a, emb.weight.grad, None])
    assert got.tolist() == pytest.approx(
        [float(a.square().sum()), float(emb.weight.grad.to_dense().square().sum()), 0.0], rel=1e-12
    )
    sq([a * 2, emb.weight.grad, None])
    assert sq.plans_built == 1  # same layout: the plan is reused
    got = sq([a, a.float(), a])  # a dtype and a presence changed: planned again
    assert sq.plans_built == 2 and got.tolist() == pytest.approx(
        [float(a.square().sum())] * 3, rel=1e-6
    )


def test_torch_transformer_encoder_is_probed():
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
        num_layers=3,
        enable_nested_tensor=False,
    ).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    outs = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append((args[0], out))

    handles = [layer.register_forward_hook(keep) for layer in enc.layers]
    enc(x).square().mean().backward()
    for h in handles:
        h.remove()
    ref = {
        k: (
            naive_stats(i, o)["cos_adjacent"],
            naive_act(o.grad),
            param_norm(enc.layers[k].parameters()),
        )
        for k, (i, o) in enumerate(outs)
    }
    enc.zero_grad()
    probe = Probe(enc)
    with probe:
        enc(x).square().mean().backward()
        rows = {(r["layer"], r["sublayer"], r["metric"]): r["value"] for r in probe.step()}
    for k, (cos, act, pn) in ref.items():
        assert rows[(k, "block", "cos_adjacent")] == pytest.approx(cos, rel=1e-9)
        assert rows[(k, "block", "act_grad_norm")] == pytest.approx(act, rel=1e-9)
        assert rows[(k, "block", "param_grad_norm")] == pytest.approx(pn, rel=1e-9)


@pytest.mark.parametrize("offset,step", [(0.0, 0.3), (3.0, 0.3), (10.0, 1e-3)])
def test_token_stats_in_float32_match_the_float64_twin(offset, step):
    """The lean pass takes LayerNorm moments from norms and means (var = |x|^2/d - mean^2): in float32,
    with a large per-token mean and small updates (an angle of 1e-4: arccos(cos) is 40 % off in float32),
    it still agrees with the float64 naive twin."""
    from residual_probe.probe.quantities import TOKEN_STATS, Transition

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 256, generator=g, dtype=torch.float64) + offset
    b = a + step * torch.randn(64, 256, generator=g, dtype=torch.float64)
    ref = naive_stats(a, b)
    from residual_probe.probe.quantities.token_stats import RAW, raw_columns

    raw = torch.empty(64, len(RAW))
    raw_columns(a.float(), b.float(), raw, torch.ones(64, 1))  # the in-place path (large states)
    for t in (
        Transition.of(a.float(), b.float()),
        Transition(raw, 256),
    ):  # the chained path, the in-place path
        for s in TOKEN_STATS:
            got = float(s(t).double().mean())
            assert got == pytest.approx(ref[s.name], rel=1e-4), (
                s.name
            )  # angle from the chord, not arccos


class _Res(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class _Stack(torch.nn.Module):
    """Residual blocks in a ModuleList whose loop edits the hidden state between blocks: in place
    (`inplace`), or by handing the next block a new tensor (`inplace=False`)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.h = torch.nn.ModuleList(_Res() for _ in range(4))
        self.inplace = inplace
        self.seen = []

    def forward(self, x):
        for blk in self.h:
            y = blk(x)
            self.seen.append((x.clone(), y.clone()))
            x = y.add_(0.5) if self.inplace else y + 0.5
        return x


CHAIN_SIZES = [
    4 << 20,
    1,
    9000,
]  # the default; no chains (every state in place); chains of 4-5 states and some in place


@pytest.mark.parametrize("chain_bytes", CHAIN_SIZES)
@pytest.mark.parametrize("inplace", [True, False])
def test_forward_stats_chain_blocks_only_while_each_input_is_the_previous_output(
    inplace, chain_bytes, monkeypatch
):
    """A block's output is queued as the next block's input only when the input is that very
    tensor, unmodified: an in-place edit (after the hook copied the output) or a new tensor between
    blocks gives the naive numbers of what each block really received, whatever the chain length."""
    monkeypatch.setattr("residual_probe.probe.quantities.forward_stats.CHAIN_BYTES", chain_bytes)
    torch.manual_seed(0)
    model = _Stack(inplace).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with (
        Probe(model, blocks="h.*", quantities=("forward_stats",), include_eval=True) as probe,
        torch.no_grad(),
    ):
        model(x)
        rows = {(r["layer"], r["metric"]): r["value"] for r in probe.step()}
    assert len(model.seen) == 4
    for k, (a, b) in enumerate(model.seen):
        ref = naive_stats(a, b)
        for name in ("cos_adjacent", "ln_update", "relative_update", "norm_sq_per_dim"):
            assert rows[(k, name)] == pytest.approx(ref[name], rel=1e-9), (k, name)


class _TwoWidths(torch.nn.Module):
    """Two stacks of residual blocks at widths 16 and 8, and a record of what each block saw."""

    def __init__(self):
        super().__init__()
        self.wide, self.narrow = _Stack(False), torch.nn.Module()
        self.narrow.h = torch.nn.ModuleList(_Res8() for _ in range(3))
        self.down = torch.nn.Linear(16, 8)
        self.seen = {}

    def forward(self, x):
        for k, blk in enumerate(self.wide.h):
            y = blk(x)
            self.seen.setdefault(("wide.h", k), []).append((x.clone(), y.clone()))
            x = y
        x = self.down(x)
        for k, blk in enumerate(self.narrow.h):
            y = blk(x)
            self.seen.setdefault(("narrow.h", k), []).append((x.clone(), y.clone()))
            x = y
        return x


class _Res8(_Res):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)


@pytest.mark.parametrize("chain_bytes", CHAIN_SIZES)
def test_forward_stats_pool_forwards_of_other_lengths_and_stacks_of_other_widths(
    chain_bytes, monkeypatch
):
    """Micro-batches of growing and shrinking length in one step (the pending buffer grows mid-step)
    and two stacks of different widths: each block's values are the token means over everything
    it saw, as the naive twin computes them on the concatenated tokens."""
    monkeypatch.setattr("residual_probe.probe.quantities.forward_stats.CHAIN_BYTES", chain_bytes)
    torch.manual_seed(0)
    model = _TwoWidths().double()
    with (
        Probe(model, blocks="*.h.*", quantities=("forward_stats",), include_eval=True) as probe,
        torch.no_grad(),
    ):
        for seq in (5, 9, 3, 9):
            model(torch.randn(2, seq, 16, dtype=torch.float64))
        rows = {
            (r["stack"], r["layer"], r["metric"]): r["value"]
            for r in probe.step()
            if r["stack"] != "-"
        }
    assert {s for s, _, _ in rows} == {"wide.h", "narrow.h"}
    for (stack, k), pairs in model.seen.items():
        a = torch.cat([p.reshape(-1, p.shape[-1]) for p, _ in pairs])
        b = torch.cat([c.reshape(-1, c.shape[-1]) for _, c in pairs])
        ref = naive_stats(a, b)
        for name in (
            "cos_adjacent",
            "angular_distance",
            "ln_update",
            "relative_update",
            "norm_sq_per_dim",
        ):
            assert rows[(stack, k, name)] == pytest.approx(ref[name], rel=1e-9), (stack, k, name)


HOLD_SIZES = [
    4 << 20,
    1,
    3000,
]  # the default (all held to step()); each normed in its hook; a few at a time


@pytest.mark.parametrize("hold_bytes", HOLD_SIZES)
@pytest.mark.parametrize("arch,placement", [("decoder", "pre-ln"), ("seq2seq", "residual")])
def test_act_grad_norm_held_gradients_equal_direct_over_micro_batches(
    arch, placement, hold_bytes, monkeypatch
):
    """Gradients are held and normed in batches: whatever the batch size, over micro-batches and
    over two stacks (the backward jumps from the decoder to the encoder) and two streams a block,
    the values are those of the full batch computed directly."""
    monkeypatch.setattr("residual_probe.probe.quantities.act_grad_norm.HOLD_BYTES", hold_bytes)
    model = make(arch, placement)
    inp, targets = inputs(arch, batch=4)
    ref = {k: v for k, v in reference(model, inp, targets).items() if k[-1] == "act_grad_norm"}
    probe = Probe(model, quantities=("act_grad_norm",))
    with probe:
        for half in (slice(0, 2), slice(2, 4)):
            loss_of(model(*(x[half] for x in inp)), targets[half], scale=0.5).backward()
        got = {
            (r["stack"], r["layer"], r["sublayer"], r["stream"], r["metric"]): r["value"]
            for r in probe.step()
        }
    assert set(ref) <= set(got) and len(ref) >= 3
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


class _GradTimes3(torch.autograd.Function):
    """Identity forward; backward triples its grad_output, in place (inplace=True) or not."""

    @staticmethod
    def forward(ctx, x, inplace):
        ctx.inplace = inplace
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (g.mul_(3) if ctx.inplace else g * 3), None


def test_act_grad_norm_of_a_gradient_modified_after_its_hook_is_nan_said_once_then_exact(
    monkeypatch,
):
    """A custom Function that makes block 0's output and writes into its grad_output in place: the held
    gradient changed before it was normed. That step's value is NaN (not the tripled norm), a warning
    says so once, and later steps norm in the hook: the value equals the out-of-place twin's."""

    def run(inplace):
        model = make("decoder", "pre-ln")
        inp, targets = inputs("decoder")
        hook = model.decoder.layers[0].register_forward_hook(
            lambda m, a, out: _GradTimes3.apply(out, inplace)
        )
        probe = Probe(
            model, quantities=("act_grad_norm",)
        )  # attached after: sees the Function's output
        steps = []
        with probe:
            for _ in range(2):
                loss_of(model(*inp), targets).backward()
                steps.append(
                    {(r["layer"], r["metric"]): r["value"] for r in probe.step() if r["layer"] >= 0}
                )
                model.zero_grad(set_to_none=True)
        hook.remove()
        return steps

    twin = run(False)
    with pytest.warns(UserWarning, match="modified in place during backward") as caught:
        first, second = run(True)
    assert sum("modified in place" in str(w.message) for w in caught) == 1
    assert math.isnan(first[(0, "act_grad_norm")])
    for key, value in twin[1].items():
        assert second[key] == pytest.approx(value, rel=1e-12), key
        if key[0] > 0:
            assert first[key] == pytest.approx(value, rel=1e-12), key


def test_step_runs_no_garbage_collection_and_restores_the_collector():
    """probe.step() makes a 0-d tensor per parameter; counted by a running collector in a deep model
    they triggered tens of passes inside every step (and, at depth 768, a full collection every
    other step). step() holds the collector off: with thresholds low enough that an unpaused step
    runs ~50 passes here, at most one runs (when the collector comes back on), and the collector's
    state (on or off) is what it was."""
    import gc

    model = build_model(
        arch="decoder", placement="pre-ln", depth=150, d_model=8, heads=2, ffn=8, vocab_size=11
    )
    assert sum(1 for _ in model.parameters()) > 2000
    tok = torch.randint(0, 11, (2, 4))
    probe = Probe(model, quantities=("param_grad_norm",), keep_rows=False)
    passes = []

    def count(phase, info):
        if phase == "start":
            passes.append(info["generation"])

    thresholds = gc.get_threshold()
    gc.set_threshold(
        100, 1, 1
    )  # a collector eager to run full passes: as a deep model's many objects make it
    gc.callbacks.append(count)
    try:
        with probe:
            for enabled in (True, False):
                (gc.enable if enabled else gc.disable)()
                for _ in range(3):
                    model(tok).float().square().mean().backward()
                    del passes[:]
                    probe.step()
                    assert len(passes) <= 1 and gc.isenabled() is enabled
                    assert enabled or passes == []  # a disabled collector stays off: no pass at all
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*thresholds)
        gc.enable()
