"""Reductions over the learner's processes: sums, concatenations and minima of small tensors,
returned on the CPU; with one process each is the identity."""

from __future__ import annotations

import torch
from torch import Tensor

from ..algo.distributed import all_gather_varlen


class Ranks:
    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.device = accelerator.device

    def sum(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        return self.accelerator.reduce(x.to(self.device), reduction="sum").cpu()

    def cat(self, x: Tensor) -> Tensor:
        """Concatenate a 1-D tensor over ranks (rank order)."""
        if self.world == 1:
            return x

        return all_gather_varlen(x.to(self.device)).cpu()

    def sum_dict(self, d: dict[str, float]) -> dict[str, float]:
        """Each value summed over ranks, in one float64 reduction."""
        if self.world == 1 or not d:
            return d
        keys = sorted(d)
        v = self.sum(torch.tensor([d[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, v.tolist()))

    def min(self, x: Tensor) -> Tensor:
        if self.world == 1:
            return x
        return self.accelerator.gather(x.to(self.device).reshape(1)).min().cpu()

    def max(self, x: Tensor) -> Tensor:
        """Elementwise maximum over ranks."""
        if self.world == 1:
            return x
        return self.accelerator.reduce(x.to(self.device), reduction="max").cpu()

    def count(self, x: float) -> float:
        """A local count summed over ranks."""
        return float(self.sum(torch.tensor(float(x))))
