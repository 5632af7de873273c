"""FSDP2 with torch's `fully_shard`, the same on CPU (gloo) and GPU (NCCL); used by the
learner's strategy, the sharded start-up and the KL reference model."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .gloo_reduce import SlicedReduceScatter
from .precision import Precision


def apply_fsdp2(model: nn.Module, precision: Precision, device: torch.device, *,
                reshard_after_forward: bool = True, offload: bool = False,
                materialized: bool = True) -> nn.Module:
    """`fully_shard` each decoder layer (`_no_split_modules`), then the root (embeddings,
    final norm, LM head). Parameters stay fp32 (sharded); with a bf16 compute dtype they are
    all-gathered in bf16 and gradients reduce-scattered in fp32. `materialized=False`: the
    parameters are on the meta device (sharded start-up, `sharded_load.py`), left there."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )

    mp = MixedPrecisionPolicy(
        param_dtype=None if precision.compute == torch.float32 else precision.compute,
        reduce_dtype=torch.float32,
    )
    kw: dict[str, Any] = {"mp_policy": mp}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    elif materialized:
        model.to(device)
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_names]
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    if dist.is_initialized() and dist.get_backend() == "gloo":  # reduce-scatter in slices
        for m in [*layers, model]:
            if isinstance(m, FSDPModule):
                m.set_custom_reduce_scatter(SlicedReduceScatter())
    return model
