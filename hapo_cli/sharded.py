"""Full (unsharded) parameters of a learner's model, one at a time, for a rollout engine.

DDP / one process: the parameters themselves. FSDP2: each DTensor's `full_tensor()` (an
all-gather per parameter). DeepSpeed ZeRO-3: each parameter gathered with
`GatheredParameters` and copied out before it is released. Every rank takes part in each
gather, so every colocated engine receives the full weights. Imports only torch (deepspeed
lazily): the learner and the engines both use it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor


def sharding_of(accelerator) -> str:
    """'none', 'fsdp' or 'zero3' (ZeRO-1/2 keep full parameters on every rank)."""
    if accelerator is None:
        return "none"
    kind = str(getattr(accelerator, "distributed_type", "NO"))
    if kind.endswith("FSDP"):
        return "fsdp"
    if kind.endswith("DEEPSPEED"):
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
            return "zero3"
    return "none"


def full_named_parameters(model, accelerator) -> Iterator[tuple[str, Tensor]]:
    sharding = sharding_of(accelerator)
    base = model
    while hasattr(base, "module"):  # DDP / accelerate wrappers
        base = base.module
    if sharding == "zero3":
        import deepspeed  # present whenever accelerate runs DeepSpeed

        for name, p in base.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, p.data.detach().clone()
        return
    for name, p in base.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 DTensor
        yield name, full.detach()
