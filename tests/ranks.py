"""Start a distributed test's ranks: `spawn_ranks(fn, args, nprocs)` is torch.multiprocessing.spawn's
call, but the ranks fork from a server that has imported torch once ("forkserver") instead of each
importing it from cold ("spawn"): about 2 s of CPU per rank, and the suite starts a dozen ranks.
Each rank is still its own process with its own gloo group, which is what those tests need."""

import multiprocessing

import torch.multiprocessing as mp

multiprocessing.set_forkserver_preload(
    ["torch", "torch.distributed", "residual_probe.models", "residual_probe.probe"]
)


def spawn_ranks(fn, args=(), nprocs=1):
    """fn(rank, *args) on `nprocs` processes; waits for all, raises if one fails (as mp.spawn)."""
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
