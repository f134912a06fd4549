"""DDP and FSDP2 with 2 processes on CPU (gloo): the probe's numbers are global and rank-independent.

Each rank takes half of a global batch; the reference is one process on the whole batch. With a
mean loss per rank and gradients averaged across ranks (DDP's and FSDP's default), every
recorded quantity must equal the single-process number, on both ranks. Under FSDP2 the
parameters are DTensor shards, so this also checks that norms are reduced across shards
(the shard-local norm is checked to differ, so the test can fail).
"""

import math
import pickle
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import assert_values_close, tiny_model
from ranks import spawn_ranks

from residual_probe.probe import Probe

SIZES = dict(
    arch="decoder", placement="pre-ln", depth=2, d_model=16, heads=2, ffn=24, vocab_size=23
)
GLOBAL_BATCH, T = 4, 5


def data():
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(1, SIZES["vocab_size"], (GLOBAL_BATCH, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def make_model():
    return tiny_model(**SIZES).double()


def run_steps(model, probe, tok, tgt, steps=2, opt=None, after_step=None):
    """Two steps (with an SGD update between) so that sharded parameters also change."""
    rows = []
    with probe:
        for _ in range(steps):
            loss = F.cross_entropy(model(tok).flatten(0, 1), tgt.flatten())
            loss.backward()
            rows += probe.step()
            if after_step is not None:
                after_step()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {
        (r["step"], r["stack"], r["layer"], r["sublayer"], r["stream"], r["metric"]): r["value"]
        for r in rows
    }


COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather")


@contextmanager
def probe_reductions():
    """The collectives (all-reduce, all-gather) the probe's own code calls inside, in a list of
    their names: DDP's reducer, FSDP2 and DTensor call theirs from torch's code, not counted."""
    import sys

    calls, real = [], {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name):
        def counted(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("residual_probe"):
                calls.append(name)
            return real[name](*args, **kwargs)

        return counted

    for name in real:
        setattr(dist, name, counting(name))
    try:
        yield calls
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def _worker(rank, world, tmp, mode):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        tok, tgt = data()
        half = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        model = make_model()
        extra = {}
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for blk in model.decoder.layers:
                fully_shard(blk, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
            w = model.decoder.layers[0].ffn.fc1.weight
            extra["sharded"] = type(w).__name__ == "DTensor"
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        probe = Probe(wrapped, subsample_tokens=4)

        def shard_local_norm():  # what a shard-local norm says (the bug the probe avoids)
            if mode == "fsdp":
                grads = [p.grad.to_local() for p in model.decoder.layers[0].parameters()]
                extra["local_block0"] = math.sqrt(sum(float((g**2).sum()) for g in grads))

        with probe_reductions() as calls:
            rows = run_steps(
                wrapped, probe, tok[half], tgt[half], opt=opt, after_step=shard_local_norm
            )
        extra["reductions"] = len(calls)
        with open(f"{tmp}/rank{rank}.pkl", "wb") as fh:
            pickle.dump((rows, extra), fh)
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def run_distributed(tmp_path, mode):
    spawn_ranks(_worker, args=(2, str(tmp_path), mode), nprocs=2)
    out = []
    for r in range(2):
        with open(tmp_path / f"rank{r}.pkl", "rb") as fh:
            out.append(pickle.load(fh))
    return out


def single_process():
    tok, tgt = data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return run_steps(model, Probe(model, subsample_tokens=4), tok, tgt, opt=opt)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(tmp_path, mode):
    (rows0, extra0), (rows1, extra1) = run_distributed(tmp_path, mode)
    ref = single_process()
    assert any(k[-1] == "act_grad_norm" for k in ref) and any(k[-1] == "cos_adjacent" for k in ref)
    assert_values_close(rows0, ref)
    assert_values_close(rows1, ref)
    assert (
        extra0["reductions"] == extra1["reductions"] == 2
    )  # one collective per recorded step (an all-gather: maxima ride with the sums), none in hooks
    # the maxima are over every rank's tokens: each half-batch alone has a smaller one
    tok, _ = data()
    model = make_model()
    with torch.no_grad():
        halves = [float(model(tok[i * 2 : i * 2 + 2]).max()) for i in range(2)]
    whole = ref[(0, "model", -1, "head", "-", "logit_max")]
    assert halves[0] != halves[1] and whole == pytest.approx(max(halves), rel=1e-12)
    assert any(k[-1] == "attn_logit_max" for k in ref) and any(
        k[-1] == "norm_sq_per_dim_max" for k in ref
    )
    if mode == "fsdp":
        assert extra0["sharded"] and extra1["sharded"]
        # step 1, block 0: each shard-local norm falls short; their squares add up to the global one
        global_norm = ref[(1, "decoder", 0, "block", "-", "param_grad_norm")]
        l0, l1 = extra0["local_block0"], extra1["local_block0"]
        assert l0 < 0.95 * global_norm and l1 < 0.95 * global_norm
        assert math.hypot(l0, l1) == pytest.approx(global_norm, rel=1e-9)
