"""Summing `policy_loss` metrics over micro-batches without a host sync per micro-batch.

`policy_loss` returns detached 0-dim tensors (`algo/loss.py` says how each combines). Reading
each with `float()` as it arrives costs one device-to-host sync per metric per micro-batch; this
keeps the running sums on the device in float64 and reads them all with one `tolist()` per
update. The arithmetic is the one the learner did in Python floats (IEEE float64 both ways: each
value widened to float64, multiplied by the micro-batch's valid-token count, added in arrival
order), so the logged numbers are bit-identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis import schema

from ..algo.loss import ADDITIVE


def is_additive(name: str) -> bool:
    """Sums, counts (`algo.loss.ADDITIVE`) and the loss add across micro-batches; other
    metrics are per-token means, combined weighted by each micro-batch's valid tokens."""
    return name == schema.PG_LOSS or name in ADDITIVE


class MetricSums:
    """Running sums (and valid-token weights) of per-micro-batch metrics, on their device."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._weights: dict[str, Tensor] = {}

    def add(self, metrics: dict[str, Tensor], mask: Tensor) -> None:
        """Add one micro-batch's metrics; `mask` (B, T) its loss mask (the valid-token count
        when the metrics carry no `valid_tokens`)."""
        n_valid = metrics.get(schema.VALID_TOKENS)
        n = (n_valid if n_valid is not None else mask.sum()).detach().double()
        for k, v in metrics.items():
            v = torch.as_tensor(v).detach().double()
            if is_additive(k):
                self._sums[k] = self._sums[k] + v if k in self._sums else v
            else:
                self._sums[k] = self._sums[k] + v * n if k in self._sums else v * n
                self._weights[k] = self._weights[k] + n if k in self._weights else n

    def totals(self) -> tuple[dict[str, float], dict[str, float]]:
        """(sums, weights) as Python floats: one host sync for all of them."""
        names = [*self._sums, *self._weights]
        if not names:
            return {}, {}
        values = torch.stack([*self._sums.values(), *self._weights.values()]).cpu().tolist()
        k = len(self._sums)
        return dict(zip(names[:k], values[:k])), dict(zip(names[k:], values[k:]))


__all__ = ["MetricSums", "is_additive"]
