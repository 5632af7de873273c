"""The learning-rate schedule: linear warm-up, then constant. Pure; the trainer steps it.

Two conventions, chosen by `train.warmup_unit` and `train.warmup_start`:

- hapo's own (tiny recipes): one scheduler step per optimizer step, factor (k+1)/n at step k,
  so the first update already uses lr/n;
- verl's, which the HAPO authors' scripts ran (`lr_warmup_steps=10`): `fsdp_workers.py` steps
  the scheduler once per `update_actor` call, i.e. once per training step, and
  `get_constant_schedule_with_warmup` (verl/utils/torch_functional.py) gives k/n, so training
  step 1 runs at lr 0 and step 11 is the first at the full lr.
"""

from __future__ import annotations

from typing import Any

import torch


def warmup_factor(k: int, warmup_steps: int, start: str = "one_over_n") -> float:
    """lr multiplier at scheduler step k (0-based) of a linear warm-up over `warmup_steps`:

        one_over_n: min(1, (k + 1) / n)        zero: k / n for k < n, then 1

    n = 0 means no warm-up (1.0 at every step).
    """
    if k < 0 or warmup_steps < 0:
        raise ValueError(f"warmup_factor: need k >= 0 and warmup_steps >= 0, got {k}, {warmup_steps}")
    if warmup_steps == 0:
        return 1.0
    if start == "one_over_n":
        return min(1.0, (k + 1) / warmup_steps)
    if start == "zero":
        return k / warmup_steps if k < warmup_steps else 1.0
    raise ValueError(f"warmup_factor: start='{start}' is not one of: one_over_n, zero")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg: Any):
    """A LambdaLR over `warmup_factor` for a `TrainConfig` (warmup_steps, warmup_start)."""
    n, start = train_cfg.warmup_steps, train_cfg.warmup_start
    warmup_factor(0, n, start)  # validate now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: warmup_factor(k, n, start))
