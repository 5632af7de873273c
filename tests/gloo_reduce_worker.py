"""The sliced gloo reduce-scatter (hapo_cli/learner/gloo_reduce.py) against the unsliced one, on
2 gloo ranks (run by torchrun from tests/test_gloo_reduce.py; not collected by pytest). Each
rank writes OUT/results-RANK.pt: the sliced and unsliced results of each case, and the sizes of
the inputs the sliced path handed the collective.

    python -m torch.distributed.run --nproc_per_node 2 tests/gloo_reduce_worker.py OUT
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

DONE = "gloo_reduce_worker: every case written,"


def _data(rank: int, numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 10 + rank)  # a different gradient per rank
    return torch.randn(numel, generator=g)


def plain(rank: int, world: int, out: dict) -> None:
    """`reduce_scatter_in_slices` vs one `reduce_scatter_single`: a slice that divides n, one
    that leaves a remainder, a slice larger than n; output separate and as a view of the input."""
    from hapo_cli.learner.gloo_reduce import reduce_scatter_in_slices

    sizes: list[int] = []

    def call(o, i):
        sizes.append(i.numel())
        dist.reduce_scatter_single(output=o, input=i)

    for n, slice_numel in ((24, 12), (23, 10), (7, 100)):
        x = _data(rank, world * n, n)
        whole = torch.empty(n)
        dist.reduce_scatter_single(output=whole, input=x.clone())
        sliced = torch.empty(n)
        sizes.clear()
        reduce_scatter_in_slices(call, sliced, x.clone(), rank=rank, world=world,
                                 slice_numel=slice_numel)
        inp = x.clone()  # DeepSpeed's call: the output is this rank's part of the input
        aliased = inp.view(world, n)[rank]
        reduce_scatter_in_slices(call, aliased, inp, rank=rank, world=world,
                                 slice_numel=slice_numel)
        out[f"plain-{n}-{slice_numel}"] = {"whole": whole, "sliced": sliced,
                                           "aliased": aliased.clone(), "sizes": list(sizes)}


def deepspeed_path(rank: int, out: dict) -> None:
    """DeepSpeed's `reduce_scatter_coalesced` (ZeRO-3's gradient reduction): one tensor that
    divides by the world (its in-place path) and two with padding (its interleaved copy),
    before and after `slice_deepspeed_reduce_scatter`."""
    import deepspeed
    from deepspeed.runtime.comm import coalesced_collectives as cc

    from hapo_cli.learner.gloo_reduce import slice_deepspeed_reduce_scatter

    deepspeed.init_distributed(dist_backend="gloo")
    real = cc._torch_reduce_scatter_fn
    sizes: list[int] = []

    def spy(input_tensor, output_tensor, group=None, async_op=False, prof=False):
        sizes.append(input_tensor.numel())
        return real(input_tensor, output_tensor, group=group, async_op=async_op, prof=prof)

    cases = {"one": [(10, 6)], "padded": [(5, 7), (33,)]}
    for name, shapes in cases.items():
        tensors = [_data(rank, int(torch.tensor(s).prod()), i).view(s)
                   for i, s in enumerate(shapes)]
        cc._torch_reduce_scatter_fn = real
        whole = [t.clone() for t in cc.reduce_scatter_coalesced([t.clone() for t in tensors])]
        cc._torch_reduce_scatter_fn = spy
        slice_deepspeed_reduce_scatter(slice_numel=8)
        slice_deepspeed_reduce_scatter(slice_numel=8)  # idempotent: wraps the spy once
        sizes.clear()
        sliced = [t.clone() for t in cc.reduce_scatter_coalesced([t.clone() for t in tensors])]
        out[f"deepspeed-{name}"] = {"whole": whole, "sliced": sliced, "sizes": list(sizes)}
    cc._torch_reduce_scatter_fn = real


def fsdp2_path(rank: int, out: dict) -> None:
    """FSDP2's gradients of a two-layer MLP: default reduce-scatter vs `SlicedReduceScatter`."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from hapo_cli.learner.gloo_reduce import SlicedReduceScatter

    class Counted(SlicedReduceScatter):
        calls = 0

        def __call__(self, *args, **kwargs):
            Counted.calls += 1
            return super().__call__(*args, **kwargs)

    grads: dict = {}
    for name in ("whole", "sliced"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 30), torch.nn.Tanh(),
                                    torch.nn.Linear(30, 5))
        fully_shard(model)
        if name == "sliced":
            assert isinstance(model, FSDPModule)
            model.set_custom_reduce_scatter(Counted(slice_numel=40))
        x = _data(rank, 4 * 16, 7).view(4, 16)
        model(x).square().sum().backward()
        grads[name] = [p.grad.to_local().clone() for p in model.parameters()]  # type: ignore[union-attr]
    grads["calls"] = Counted.calls
    out["fsdp2"] = grads


def main() -> None:
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {"world": world}
    plain(rank, world, out)
    deepspeed_path(rank, out)
    fsdp2_path(rank, out)
    torch.save(out, Path(sys.argv[1]) / f"results-{rank}.pt")
    print(f"{DONE} rank {rank}", file=sys.stderr, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip teardown: DeepSpeed's and gloo's C++ destructors (CALIBRATION.md)


if __name__ == "__main__":
    main()
