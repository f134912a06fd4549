"""The probe in real training loops: AMP, torch.compile, frozen layers, wrappers, MoE, two probes,
bounded state between steps, a planned-once parameter plan, deferred export, update_ratio.

Each test is a regression test of a defect seen in issue 9 (it fails on the probe before it)
or checks a new quantity against a naive twin.
"""

import math
import warnings

import pytest
import torch
from conftest import assert_values_close, keyed
from test_probe import SIZES, inputs, loss_of, make, probed
from torch import nn

from residual_probe.models import build_model
from residual_probe.probe import Probe, ProbeError


def train(model, probe, inp, targets, steps=3, opt=None):
    with probe:
        for _ in range(steps):
            loss_of(model(*inp), targets).backward()
            probe.step()
            if opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)
    return keyed(probe.rows())


# ---- mixed precision -------------------------------------------------------------------------


def amp_rows(scaler_arg: bool, unscale_first: bool = False):
    torch.manual_seed(0)
    model = build_model(
        arch="decoder", placement="pre-ln", depth=3, d_model=32, heads=2, ffn=64, vocab_size=23
    )
    inp, targets = inputs("decoder", batch=4, T=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    probe = Probe(
        model,
        quantities=("param_grad_norm", "act_grad_norm", "w2_grad_norm"),
        scaler=scaler if scaler_arg else None,
    )
    with probe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model(*inp), targets)
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)
        rows = keyed(probe.step())
        scaler.step(opt)
        scaler.update()
    fp32 = Probe(model, quantities=("param_grad_norm", "act_grad_norm", "w2_grad_norm"))
    model.zero_grad(set_to_none=True)
    with fp32:
        loss_of(model(*inp), targets).backward()
        ref = keyed(fp32.step())
    return rows, ref


AMP_TOL = 0.05  # bf16 autocast keeps ~3 significant digits: per-block norms agree to a few percent


@pytest.mark.parametrize("unscale_first", [False, True])
def test_bf16_autocast_with_grad_scaler_records_unscaled_norms(unscale_first):
    rows, ref = amp_rows(scaler_arg=True, unscale_first=unscale_first)
    assert set(rows) == set(ref)
    for key, value in ref.items():
        if key[-1] != "nonfinite_count":
            assert rows[key] == pytest.approx(value, rel=AMP_TOL), key
    scaled, _ = amp_rows(scaler_arg=False)  # without the scaler: off by the scale, 4096
    key = (0, "decoder", 1, "block", "-", "param_grad_norm")
    assert scaled[key] == pytest.approx(2.0**12 * ref[key], rel=AMP_TOL)


def test_scaler_must_be_a_grad_scaler():
    with pytest.raises(ProbeError, match="GradScaler"):
        Probe(make("decoder", "pre-ln"), scaler=2.0)


# ---- torch.compile ---------------------------------------------------------------------------


def test_a_compiled_model_is_refused_with_one_line_saying_what_to_do():
    model = make("decoder", "pre-ln")
    with pytest.raises(
        ProbeError,
        match=r"already torch.compile'd.*Probe\(model\).attach\(\); model = torch.compile",
    ) as e:
        Probe(torch.compile(model, backend="eager"))
    assert "\n" not in str(e.value)


def test_attached_before_compile_records_what_eager_records_without_recompiles():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    inp, targets = inputs("decoder")
    model = make("decoder", "pre-ln")
    ref = train(model, Probe(model, subsample_tokens=4), inp, targets, steps=3)
    model = make("decoder", "pre-ln")
    probe = Probe(model, subsample_tokens=4).attach()
    compiled = torch.compile(model, backend="eager")
    graphs = []
    for _ in range(3):
        loss_of(compiled(*inp), targets).backward()
        probe.step()
        model.zero_grad(set_to_none=True)
        graphs.append(counters["stats"]["unique_graphs"])
    probe.detach()
    got = keyed(probe.rows())
    assert_values_close(got, ref)
    print("unique graphs per step:", graphs)
    assert graphs[0] == graphs[-1]  # no recompilation after the first step (schedule, block index)
    assert graphs[0] <= 2 * SIZES["depth"] + 4  # graph breaks at the hooks, not a graph per step
    torch._dynamo.reset()


# ---- frozen layers, no backward -----------------------------------------------------------------


def test_blocks_without_gradient_are_missing_not_zero():
    model = make("decoder", "pre-ln")
    for p in model.decoder.layers[1].parameters():
        p.requires_grad_(False)
    inp, targets = inputs("decoder")
    with pytest.warns(UserWarning, match="had no .grad") as said:
        probe, got = probed(model, inp, targets, quantities=("param_grad_norm",))
    assert sum("had no .grad" in str(w.message) for w in said) == 1
    assert math.isnan(got[("decoder", 1, "block", "-", "param_grad_norm")])
    assert got[("decoder", 0, "block", "-", "param_grad_norm")] > 0
    n_missing = sum(1 for k, v in got.items() if k[-1] == "param_grad_norm" and math.isnan(v))
    assert n_missing >= 3 and got[("-", -1, "-", "-", "no_grad_count")] == n_missing
    assert got[("-", -1, "-", "-", "nonfinite_count")] == 0  # missing is not non-finite
    with warnings.catch_warnings():  # said once per probe, not every step
        warnings.simplefilter("error")
        loss_of(model(*inp), targets).backward()
        with probe:
            probe.step()


def test_step_before_any_backward_records_missing():
    model = make("decoder", "pre-ln")
    with pytest.warns(UserWarning, match="had no .grad"):
        with Probe(model, quantities=("param_grad_norm", "w2_grad_norm")) as probe:
            rows = probe.step()
    assert all(
        math.isnan(r["value"]) for r in rows if r["metric"] in ("param_grad_norm", "w2_grad_norm")
    )
    # missing, not non-finite: the parts outside the blocks and the total too
    got = {(r["stack"], r["sublayer"], r["metric"]): r["value"] for r in rows}
    assert got[("-", "-", "nonfinite_count")] == 0
    assert math.isnan(got[("model", "total", "param_grad_norm")])
    assert got[("-", "-", "no_grad_count")] == sum(
        1 for r in rows if r["metric"] in ("param_grad_norm", "w2_grad_norm")
    )


# ---- wrappers, W2, two probes --------------------------------------------------------------------


def test_wrapper_prefixes_are_stripped():
    pytest.importorskip("transformers")
    from test_discovery import build_hf

    model = build_hf("gpt2")
    plain = {(b.stack, b.index) for b in Probe(model).blocks}
    wrapped = {
        (b.stack, b.index) for b in Probe(nn.DataParallel(model)).blocks
    }  # DDP names it the same way
    assert plain == wrapped == {("transformer.h", 0), ("transformer.h", 1)}

    class Outer(nn.Module):  # a user's own submodule called "module" is not a wrapper
        def __init__(self):
            super().__init__()
            self.module = model.transformer
            self.head = nn.Linear(2, 2)

    assert {b.stack for b in Probe(Outer()).blocks} == {"module.h"}


class Expert(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 2 * d)


class MoEBlock(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.moe = nn.ModuleDict(
            {"gate": nn.Linear(d, n), "experts": nn.ModuleList(Expert(d) for _ in range(n))}
        )

    def forward(self, x):
        h = x + self.attn(self.norm(x))
        e = self.moe["experts"][0]
        return h + e.w2(torch.relu(e.w1(h)) * e.w3(h))


class MoEModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(MoEBlock() for _ in range(2))

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return x


def test_w2_is_chosen_by_name_and_ambiguity_fails_clearly():
    model = MoEModel()
    with pytest.raises(
        ProbeError,
        match=r"several FFN output projections \(moe.experts.0.w2, .*mixture of experts.*w2=",
    ):
        Probe(model, quantities=("w2_grad_norm",))
    probe = Probe(model, quantities=("w2_grad_norm",), w2="moe.experts.0.w2")
    with probe:
        model(torch.randn(2, 3, 8)).square().mean().backward()
        (r, _) = probe.step()
    assert r["sublayer"] == "moe.experts.0.w2" and r["value"] == pytest.approx(
        float(model.layers[1].moe["experts"][0].w2.weight.grad.norm()), rel=1e-6
    )
    with pytest.warns(UserWarning, match="w2_grad_norm skipped"):
        Probe(model)  # the default quantities skip W2 where it is ambiguous, and say so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Probe(model, quantities=("forward_stats",))  # W2 not asked for: not searched, nothing said


def test_two_probes_on_one_model_are_refused():
    model = make("decoder", "pre-ln")
    first, second = Probe(model), Probe(model)
    with first:
        with pytest.raises(ProbeError, match="another Probe is attached"):
            second.attach()
        first.attach()  # the same probe again: a no-op, not a second set of hooks
    with second:  # after the first detached
        pass


# ---- bounded state, a plan built once, deferred export -------------------------------------------


def test_state_does_not_grow_with_forwards_between_steps():
    model = make("decoder", "pre-ln")
    inp, _ = inputs("decoder")
    probe = Probe(
        model,
        quantities=("forward_stats", "subsample", "act_grad_norm"),
        include_eval=True,
        subsample_tokens=4,
    )
    with probe, torch.no_grad():
        model(*inp)
        one = probe.state_bytes()
        for _ in range(50):
            model(*inp)
        assert probe.state_bytes() == one > 0
        rows = probe.step()
    assert rows


def test_the_parameter_plan_is_built_once():
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    probe = Probe(model)
    train(model, probe, inp, targets, steps=5)
    assert probe.plans_built == 1


def test_deferred_export_gives_the_same_rows_one_step_later():
    inp, targets = inputs("decoder")
    model = make("decoder", "pre-ln")
    ref = train(model, Probe(model, subsample_tokens=4), inp, targets)
    model = make("decoder", "pre-ln")
    probe = Probe(model, subsample_tokens=4, defer=True)
    with probe:
        loss_of(model(*inp), targets).backward()
        assert probe.step() == []  # step 0's rows come with the next step()
        model.zero_grad(set_to_none=True)
        loss_of(model(*inp), targets).backward()
        assert {r["step"] for r in probe.step()} == {0}
        model.zero_grad(set_to_none=True)
        loss_of(model(*inp), targets).backward()
        probe.step()
    assert keyed(probe.rows()) == pytest.approx(ref, rel=1e-12)  # detach flushed step 2


# ---- update_ratio ----------------------------------------------------------------------------


def naive_update_ratios(model, before):
    """{(layer, sublayer): ||θ_after - θ_before|| / ||θ_before||} by hand, per block and sublayer."""
    out = {}
    for k, blk in enumerate(model.decoder.layers):
        for label, mod in (("block", blk), ("self_attn", blk.self_attn), ("ffn", blk.ffn)):
            names = [
                f"decoder.layers.{k}.{n}" if label == "block" else f"decoder.layers.{k}.{label}.{n}"
                for n, _ in mod.named_parameters()
            ]
            now = {n: p.detach() for n, p in model.named_parameters()}
            d = math.sqrt(sum(float(((now[n] - before[n]) ** 2).sum()) for n in names))
            w = math.sqrt(sum(float((before[n] ** 2).sum()) for n in names))
            out[(k, label)] = d / w
    return out


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    ],
)
def test_update_ratio_equals_a_naive_copy(make_opt):
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    opt = make_opt(model.parameters())
    probe = Probe(model, quantities=("update_ratio",), optimizer=opt)
    expect = {}
    with probe:
        for step in range(3):
            loss_of(model(*inp), targets).backward()
            probe.step()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad(set_to_none=True)
            for (k, label), v in naive_update_ratios(model, before).items():
                expect[(step, k, label)] = v
    got = {
        (r["step"], r["layer"], r["sublayer"]): r["value"]
        for r in probe.rows()
        if r["metric"] == "update_ratio"
    }
    assert {s for s, _, _ in got} == {0, 1, 2}  # step 2's update exported when the probe detached
    for key, value in expect.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    assert 1e-5 < got[(0, 0, "block")] < 1.0
    assert {sub for _, _, sub in got} >= {"group:attention", "group:ffn", "group:norm"}


def test_update_ratio_via_track_optimizer_and_its_schedule():
    model = make("decoder", "pre-ln")
    inp, targets = inputs("decoder")
    probe = Probe(model, quantities={"update_ratio": 2})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.track_optimizer(opt)  # e.g. from a framework callback, once the optimizer exists
    with probe:
        for _ in range(4):
            loss_of(model(*inp), targets).backward()
            probe.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert {r["step"] for r in probe.rows() if r["metric"] == "update_ratio"} == {0, 2}
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # detached
