"""DeepSpeed memory set-up the learner's strategy applies (strategy.py `prepare`): bucket
sizes from the model where the config leaves them out, and ZeRO-3's fp32 masters shared with
the fp32 parameter partitions (bench/bench_strategy.py has the figures)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def share_fp32_masters(optimizer) -> int:
    """Under ZeRO-3 with fp32 parameters, make each fp32 master partition the parameter
    partition itself; the bytes freed per rank. DeepSpeed means to (stage3.py
    `_create_fp32_partitions`: same dtype and device, "we don't need another copy of the
    weights"), but compares the partition's `torch.device` with the accelerator's device *name*,
    a str, which is never equal: every rank held a second fp32 copy of its partition. The copy
    was exact and DeepSpeed copies the master back into the partition after each step, so
    sharing changes no value (tests/test_zero3_start_up.py: bit for bit). Not with optimizer
    offload or NVMe swapping, or when the partitions are bf16/fp16."""
    inner, freed = optimizer, 0
    while inner is not None and not hasattr(inner, "fp32_partitioned_groups_flat"):
        inner = getattr(inner, "optimizer", None)
    if inner is None or getattr(inner, "offload_optimizer", True) or getattr(
            inner, "swap_optimizer", True):
        return 0
    for lp, master in zip(inner.fp16_partitioned_groups_flat, inner.fp32_partitioned_groups_flat):
        if (lp is None or master.dtype != lp.dtype or master.device != lp.device
                or master.untyped_storage().data_ptr() == lp.untyped_storage().data_ptr()):
            continue
        if not torch.equal(master, lp):  # what `_create_fp32_partitions` copied, unchanged
            raise AssertionError("ZeRO-3: an fp32 master partition differs from its parameters")
        freed += master.untyped_storage().nbytes()
        master.data = lp.data
    return freed


def zero_buckets(cfg: dict[str, Any], model: nn.Module) -> None:
    """Size DeepSpeed's buffers from the model, as accelerate does for `auto`, where the config
    leaves them out (accelerate's zero{2,3}.yaml do): DeepSpeed's defaults (5e8 elements) give a
    2 GB fp32 gradient bucket per rank, which a large embedding's gradient then fills."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        return
    zero = cfg.setdefault("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden * hidden, "allgather_bucket_size": hidden * hidden}
    if zero.get("stage") == 3:
        sizes.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                     stage3_param_persistence_threshold=10 * hidden)
    for key, value in sizes.items():
        if zero.get(key) in (None, "auto"):
            zero[key] = value


__all__ = ["share_fp32_masters", "zero_buckets"]
