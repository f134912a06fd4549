"""Tensor and pipeline parallelism on CPU (gloo): the probe's numbers equal a single-process twin's.

Tensor parallel (one spawn of 4 processes, a 2x2 DeviceMesh ("dp", "tp")): the reference decoder
parallelized with `torch.distributed.tensor.parallel.parallelize_module` on "tp" and FSDP2's
`fully_shard` on "dp", each data-parallel replica taking half of the global batch. Cases (all
with FSDP2 on the other dimension, float64, each rank against the twin on the whole batch):
- "tp": ColwiseParallel q/k/v and fc1, RowwiseParallel out_proj and fc2; block outputs are plain
  replicated tensors.
- "tp-dtensor": the same with use_local_output=False on the row-wise layers, the embedding's
  output made a replicated DTensor and the LayerNorms run on local tensors
  (PrepareModuleInputOutput): block outputs are replicated DTensors.
- "sp": SequenceParallel on every LayerNorm, the embedding's output sharded on the sequence, the
  row-wise layers reduce-scattering to Shard(1) with use_local_output=False: block outputs are
  sequence-sharded DTensors (each rank holds 3 of the 6 positions).
- "sp-local": as "sp" with use_local_output=True (torchtitan's setting): block outputs are plain
  tensors holding this rank's sequence shard.
Checked: param_grad_norm (blocks, sublayers, groups and the whole-model rows, stack "model"),
w2_grad_norm, the forward statistics (cos_adjacent, relative_update, norm_sq_per_dim, ln_update,
angular_distance, block_influence) and act_grad_norm equal the twin's to 1e-6 relative on every
rank, with one all-reduce per recorded step (none in the hooks: the gradient squares' sums over
shards join the token sums'); only rank 0 writes a sink named without "{rank}". update_ratio is refused under DTensor
parameters (tested).

Pipeline parallel (one spawn of 2 processes): `torch.distributed.pipelining` with a manual split
(`PipelineStage` on a stage module holding blocks 0-1 or 2-3 of a 4-block decoder, the others
deleted from a ModuleDict on stage 0 and replaced by nn.Identity in a ModuleList on stage 1), 4
micro-batches, ScheduleGPipe and Schedule1F1B (scale_grads=False, the loss divided by the number
of micro-batches, so the gradients are those of the global mean loss). Each stage's probe
(pipeline_group=WORLD) records its blocks under their global index; rank 0's rows and sink hold
every block of every step, the whole-model rows combined over the stages, equal to the
single-process run's (also update_ratio, the parameters being plain tensors there).

Not supported by PyTorch on gloo/CPU, so not tested here:
- the reference attention on DTensor q/k/v with CPU's fused attention: the op
  `aten._scaled_dot_product_flash_attention_for_cpu` has no DTensor sharding strategy, so the
  tensor-parallel cases run under `sdpa_kernel(SDPBackend.MATH)` and DTensor's
  `implicit_replication()` (the math path's causal mask is a plain tensor);
- sequence lengths the tensor-parallel degree does not divide: with 5 positions on 2 ranks gloo
  fails in the reduce-scatter (size mismatch), so the sequence is 6 long;
- pipeline combined with FSDP2 or tensor parallelism (3-D meshes) is not tested, nor the tracing
  frontend `pipeline()` (its stage modules are exported graphs, not the model's blocks).
"""

import csv
import pickle
from importlib.util import find_spec

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import keyed, tiny_model
from ranks import spawn_ranks
from test_distributed import SIZES, make_model, probe_reductions, run_steps
from torch import nn

from residual_probe.probe import Probe
from residual_probe.probe.errors import ProbeError

# Looked up, not imported: importing both costs 2 s per collecting process, and the ranks import them.
pytestmark = pytest.mark.skipif(
    find_spec("torch.distributed.tensor") is None
    or find_spec("torch.distributed.pipelining") is None,
    reason="torch without tensor parallelism or torch.distributed.pipelining",
)

GLOBAL_BATCH, T = 4, 6  # T divisible by the tensor-parallel degree (sequence parallelism)
TP_CASES = ("tp", "tp-dtensor", "sp", "sp-local")
REL = 1e-6


def data(batch=GLOBAL_BATCH, seed=3):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, SIZES["vocab_size"], (batch, T + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def spawn(worker, world, tmp_path, *args):
    """Run `worker(rank, world, tmp, *args)` on `world` gloo processes; each rank's pickled result."""
    spawn_ranks(_init, args=(world, str(tmp_path), worker, args), nprocs=world)
    out = []
    for r in range(world):
        with open(tmp_path / f"rank{r}.pkl", "rb") as fh:
            out.append(pickle.load(fh))
    return out


def _init(rank, world, tmp, worker, args):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = worker(rank, world, tmp, *args)
        with open(f"{tmp}/rank{rank}.pkl", "wb") as fh:
            pickle.dump(result, fh)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def worst(got, ref):
    """{metric: largest relative difference}; asserts the same keys and 1e-6 relative."""
    assert set(got) == set(ref), set(got) ^ set(ref)
    out = {}
    for key, value in ref.items():
        tiny = (
            abs(value) < 1e-12 and abs(got[key]) < 1e-12
        )  # zero but for rounding (the key bias's gradient)
        diff = 0.0 if tiny or value == got[key] else abs(got[key] - value) / abs(value)
        out[key[-1]] = max(out.get(key[-1], 0.0), diff)
        assert got[key] == pytest.approx(value, rel=REL, abs=1e-12), key
    return out


def sink_lines(path):
    """The (step, stack, layer) of each line of a CSV sink, sorted."""
    with open(path, newline="") as fh:
        return sorted(tuple(line[:3]) for line in list(csv.reader(fh))[1:])


def assert_one_writer(path, twin):
    """The sink has the lines of the single-process twin's, once each: one rank wrote it."""
    got, want = sink_lines(path), sink_lines(twin)
    assert want and got == want, f"{len(got)} lines, the twin wrote {len(want)}"


# ---- tensor parallel ---------------------------------------------------------------------------


def tp_plan(case, depth):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    sp = case.startswith("sp")
    local = case in ("tp", "sp-local")  # block outputs plain tensors, or DTensors
    stream = Shard(1) if sp else Replicate()
    plan = {
        "decoder.embed": PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=stream, use_local_output=local
        ),
        "output_projection": PrepareModuleInput(
            input_layouts=stream, desired_input_layouts=Replicate(), use_local_output=True
        ),
    }
    if sp:
        norm = lambda: SequenceParallel(use_local_output=False)  # noqa: E731
    elif not local:  # a replicated DTensor stream through plain norms: local in, DTensor out
        norm = lambda: PrepareModuleInputOutput(  # noqa: E731
            input_layouts=Replicate(),
            desired_input_layouts=Replicate(),
            use_local_input=True,
            output_layouts=Replicate(),
            desired_output_layouts=Replicate(),
            use_local_output=False,
        )
    else:
        norm = None
    if norm is not None:
        plan["decoder.final_norm"] = norm()
    into = dict(input_layouts=stream)
    for k in range(depth):
        b = f"decoder.layers.{k}"
        for name in (
            "q_proj",
            "k_proj",
            "v_proj",
        ):  # heads stay a DTensor dimension: the model splits by its width
            plan[f"{b}.self_attn.{name}"] = ColwiseParallel(**into, use_local_output=False)
        plan[f"{b}.self_attn.out_proj"] = RowwiseParallel(
            output_layouts=stream, use_local_output=local
        )
        plan[f"{b}.ffn.fc1"] = ColwiseParallel(**into)
        plan[f"{b}.ffn.fc2"] = RowwiseParallel(output_layouts=stream, use_local_output=local)
        if norm is not None:
            plan[f"{b}.self_attn.norm"] = norm()
            plan[f"{b}.ffn.norm"] = norm()
    return plan


def _tp_worker(rank, world, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    replica = mesh["dp"].get_local_rank()
    tok, tgt = data()
    half = slice(replica * GLOBAL_BATCH // 2, (replica + 1) * GLOBAL_BATCH // 2)
    out = {}
    for case in TP_CASES:
        model = make_model()
        parallelize_module(model, mesh["tp"], tp_plan(case, SIZES["depth"]))
        for blk in model.decoder.layers:
            fully_shard(blk, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        seen = {}

        def record_output(module, args, out, seen=seen):
            seen.setdefault("out", (type(out).__name__, str(getattr(out, "placements", ""))))

        watch = model.decoder.layers[0].register_forward_hook(record_output)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = Probe(model, subsample_tokens=4, sink=f"{tmp}/{case}.csv")
        with probe_reductions() as reductions, sdpa_kernel(SDPBackend.MATH), implicit_replication():
            rows = run_steps(model, probe, tok[half], tgt[half], opt=opt)
        watch.remove()
        out[case] = (rows, seen["out"], len(reductions))
    try:
        Probe(model, quantities=["update_ratio"], optimizer=opt)
        out["update_ratio"] = "accepted"
    except ProbeError as e:
        out["update_ratio"] = str(e)
    return out


def single_process(sink, steps=2):
    tok, tgt = data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return run_steps(
        model, Probe(model, subsample_tokens=4, sink=sink), tok, tgt, steps=steps, opt=opt
    )


def test_fsdp2_and_tensor_parallel_equal_one_process(tmp_path):
    results = spawn(_tp_worker, 4, tmp_path)
    ref = single_process(tmp_path / "twin.csv")
    assert any(k[-1] == "act_grad_norm" for k in ref) and any(k[-1] == "cos_adjacent" for k in ref)
    assert any(k[1] == "model" for k in ref) and any(k[-1] == "w2_grad_norm" for k in ref)
    outputs = {"tp": "Tensor", "tp-dtensor": "DTensor", "sp": "DTensor", "sp-local": "Tensor"}
    for case in TP_CASES:
        for _rank, result in enumerate(results):
            rows, (kind, placements), reductions = result[case]
            assert kind == outputs[case], (case, kind)  # the case tests what it says
            assert reductions == 2  # one all-reduce per recorded step (2 steps), none in the hooks
            if case == "sp":
                assert "Shard(dim=1)" in placements
            worst(rows, ref)
        assert_one_writer(tmp_path / f"{case}.csv", tmp_path / "twin.csv")
    for result in results:
        assert "update_ratio is not supported" in result["update_ratio"]


# ---- pipeline parallel -------------------------------------------------------------------------

PP_DEPTH, MICRO = 4, 4
PP_CASES = (
    ("gpipe", "dict"),
    ("1f1b", "list"),
)  # schedule, how a stage keeps its blocks' global names
QUANTITIES = (
    "param_grad_norm",
    "w2_grad_norm",
    "act_grad_norm",
    "forward_stats",
    "param_tensor_norm",
    "update_ratio",
)


def make_deep_model():
    # untied: a tie across stages needs its own all-reduce
    return tiny_model(**{**SIZES, "depth": PP_DEPTH, "tie_embeddings": False}).double()


class Stage(nn.Module):
    """One stage of the reference decoder: `decoder.layers` holds this stage's blocks under their
    global names (a ModuleDict without the others, or the ModuleList with nn.Identity in their
    place); the first stage has the embedding, the last the final norm and the output projection."""

    def __init__(self, model, stage: int, stages: int, container: str):
        super().__init__()
        per = PP_DEPTH // stages
        keep = range(stage * per, (stage + 1) * per)
        self.first, self.last = stage == 0, stage == stages - 1
        self.decoder = stack = model.decoder
        if container == "dict":
            stack.layers = nn.ModuleDict({str(k): stack.layers[k] for k in keep})
        else:
            stack.layers = nn.ModuleList(
                blk if k in keep else nn.Identity() for k, blk in enumerate(stack.layers)
            )
        if not self.first:
            stack.embed = None
        if not self.last:
            stack.final_norm = None
        self.output_projection = model.output_projection if self.last else None

    def forward(self, x):
        stack = self.decoder
        if self.first:
            x = stack.placement.begin(stack.embed(x), stack)
        layers = stack.layers.values() if isinstance(stack.layers, nn.ModuleDict) else stack.layers
        for blk in layers:
            x = blk(x)
        if self.last:
            x = self.output_projection(stack.placement.end(x, stack))
        return x


def micro_loss(logits, target):
    """Each micro-batch's mean loss over the number of micro-batches: summed, the global mean loss."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten()) / MICRO


def _pp_worker(rank, world, tmp):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    tok, tgt = data()
    mb = GLOBAL_BATCH // MICRO
    out = {}
    for schedule, container in PP_CASES:
        mod = Stage(make_deep_model(), rank, world, container)
        # static stage metadata (shapes, dtypes, which tensors need a gradient), from a forward
        # before the probe is made: no shape-inference forward inside the schedule for it to see
        x = (
            tok[:mb]
            if rank == 0
            else torch.zeros(mb, T, SIZES["d_model"], dtype=torch.float64, requires_grad=True)
        )
        y = mod(x)
        stage = PipelineStage(mod, rank, world, torch.device("cpu"), input_args=x, output_args=y)
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        sched = kind(stage, n_microbatches=MICRO, loss_fn=micro_loss, scale_grads=False)
        opt = torch.optim.SGD(mod.parameters(), lr=0.1)
        probe = Probe(
            mod,
            quantities=QUANTITIES,
            subsample_tokens=4,
            optimizer=opt,
            pipeline_group=dist.group.WORLD,
            sink=f"{tmp}/{schedule}.csv",
        )
        blocks = [(b.name, b.index) for b in probe.blocks]
        with probe:
            for _ in range(2):
                if rank == 0:
                    sched.step(tok)
                else:
                    sched.step(target=tgt)
                probe.step()
                opt.step()
                opt.zero_grad(set_to_none=True)
        out[schedule] = (keyed(probe.rows()), blocks)
    return out


def single_process_deep(sink, steps=2):
    tok, tgt = data()
    model = make_deep_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(model, quantities=QUANTITIES, subsample_tokens=4, optimizer=opt, sink=sink)
    run_steps(model, probe, tok, tgt, steps=steps, opt=opt)
    return keyed(probe.rows())


def test_pipeline_stages_equal_one_process(tmp_path):
    (stage0, stage1) = spawn(_pp_worker, 2, tmp_path)
    ref = single_process_deep(tmp_path / "twin.csv")
    assert {k[-1] for k in ref} >= {"update_ratio", "act_grad_norm", "cos_adjacent", "w2_grad_norm"}
    for schedule, _container in PP_CASES:
        rows0, blocks0 = stage0[schedule]
        rows1, blocks1 = stage1[schedule]
        # each stage discovered its own blocks under their global indices
        assert [i for _, i in blocks0] == [0, 1] and [i for _, i in blocks1] == [2, 3]
        assert blocks1[0][0] == "decoder.layers.2"
        # stage 1 kept its own blocks' rows; rank 0 holds every block of every step, equal to one process
        assert {k[2] for k in rows1 if k[1] == "decoder"} == {2, 3}
        worst(rows0, ref)
        assert_one_writer(tmp_path / f"{schedule}.csv", tmp_path / "twin.csv")
