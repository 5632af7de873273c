"""Gradient reduce-scatter in slices on gloo (CPU), for ZeRO-3 and FSDP2.

gloo's `reduce_scatter_tensor` allocates a copy of its whole input beside it (for the 890 MB
gradient of bench/bench_strategy.py's tied 151,936 x 1536 embedding: +1335 MB peak), while
that gradient is reduced at the end of the backward; NCCL reduces in place. Here the
(world * n,) input is reduced in slices of every rank's partition: slice j stages
`input[r * n + j : r * n + j + k]` of each rank r, contiguous, in one small buffer,
reduce-scatters it, and copies this rank's result into `output[j : j + k]`. Each element is
reduced across the same ranks by the same collective as before; only which elements travel
together changes (at 2 ranks a + b either way: bit for bit, tests/test_gloo_reduce.py).
Other backends keep their own call.

- ZeRO-3: DeepSpeed reduces gradients through `coalesced_collectives._torch_reduce_scatter_fn`
  (stage3.py `__avg_scatter_grads` -> `reduce_scatter_coalesced`);
  `slice_deepspeed_reduce_scatter` wraps it, process-wide, idempotent.
- FSDP2: `SlicedReduceScatter`, given to `FSDPModule.set_custom_reduce_scatter` (torch's hook
  for "control over the communication and memory usage").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

SLICE_NUMEL = 1 << 23  # elements staged per slice across all ranks: 32 MB fp32, whatever world


def reduce_scatter_in_slices(reduce_scatter: Callable[[Tensor, Tensor], object], output: Tensor,
                             input_: Tensor, *, rank: int, world: int,
                             slice_numel: int = SLICE_NUMEL) -> None:
    """`reduce_scatter(out, inp)` of `input_` (world * n,) into `output` (n,), in slices of
    max(1, slice_numel // world) elements per rank. `output` may be a view of `input_` (this
    rank's part, as DeepSpeed passes it): slice j writes only what slice j already staged."""
    n = output.numel()
    if input_.numel() != world * n:
        raise ValueError(f"reduce-scatter input has {input_.numel()} elements, expected "
                         f"world {world} x output {n}")
    parts = input_.view(world, n)  # (world, n): row r is rank r's partition
    k_max = max(1, min(n, slice_numel // world))
    staging = input_.new_empty(world * k_max)
    for j in range(0, n, k_max):
        k = min(k_max, n - j)
        stage = staging[: world * k].view(world, k)  # (world, k)
        stage.copy_(parts[:, j:j + k])
        reduce_scatter(stage[rank], stage.view(-1))  # this rank's slice of the reduced sum
        output[j:j + k].copy_(stage[rank])


def _is_gloo(group) -> bool:
    return dist.is_initialized() and dist.get_backend(group) == "gloo"


class _SlicedDeepSpeedReduceScatter:
    """DeepSpeed's `_torch_reduce_scatter_fn(input, output, group=...)`, sliced on gloo."""

    def __init__(self, original: Callable, slice_numel: int):
        self.original, self.slice_numel = original, slice_numel

    def __call__(self, input_tensor: Tensor, output_tensor: Tensor, group=None,
                 async_op: bool = False, prof: bool = False):
        world = dist.get_world_size(group)
        if not _is_gloo(group) or output_tensor.numel() * world <= self.slice_numel:
            return self.original(input_tensor, output_tensor, group=group, async_op=async_op,
                                 prof=prof)

        def call(out: Tensor, inp: Tensor):
            return self.original(inp, out, group=group, async_op=False, prof=prof)

        reduce_scatter_in_slices(call, output_tensor, input_tensor, rank=dist.get_rank(group),
                                 world=world, slice_numel=self.slice_numel)
        return None


def slice_deepspeed_reduce_scatter(slice_numel: int = SLICE_NUMEL) -> None:
    """ZeRO-3's gradient reduce-scatter in slices on gloo groups (NCCL's call is unchanged).
    Process-wide and idempotent: called again, it wraps DeepSpeed's own function anew."""
    from deepspeed.runtime.comm import coalesced_collectives as cc

    fn = cc._torch_reduce_scatter_fn
    original = fn.original if isinstance(fn, _SlicedDeepSpeedReduceScatter) else fn
    cc._torch_reduce_scatter_fn = _SlicedDeepSpeedReduceScatter(original, slice_numel)


class SlicedReduceScatter(ReduceScatter):
    """FSDP2's ReduceScatter comm: what its default (`DefaultReduceScatter`,
    `dist.reduce_scatter_single`) does, in slices on gloo."""

    def __init__(self, slice_numel: int = SLICE_NUMEL):
        self.slice_numel = slice_numel

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype,
                 device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup,
                 op, async_op: bool = False):
        world = dist.get_world_size(group)
        if not _is_gloo(group) or input_tensor.numel() <= self.slice_numel:
            return dist.reduce_scatter_single(output=output_tensor, input=input_tensor,
                                              op=cast(Any, op), group=group, async_op=async_op)

        def call(out: Tensor, inp: Tensor):
            return dist.reduce_scatter_single(output=out, input=inp, op=cast(Any, op), group=group)

        reduce_scatter_in_slices(call, output_tensor, input_tensor, rank=dist.get_rank(group),
                                 world=world, slice_numel=self.slice_numel)
        return None


__all__ = ["SLICE_NUMEL", "SlicedReduceScatter", "reduce_scatter_in_slices",
           "slice_deepspeed_reduce_scatter"]
