"""Batch entropy stats across data-parallel ranks without gathering every token.

Each rank holds the valid log-entropies `x` of its shard. The stats need the global count,
min and max of x (all-reduce), the pivot quantile rho, and `sum((x - rho)^2)` (all-reduce).
rho is exact (all-gather of x) when the global count is <= `exact_max_tokens`; otherwise it
comes from an all-reduced histogram of x with `num_bins` equal bins over the global
[min, max]: each order statistic is placed inside its bin, so |rho - exact rho| <= one bin
width, reported as `quantile_bin_error`. Everything else is exact.

The building blocks (`shard_summary`, `shard_histogram`, `quantile_from_histogram`,
`sq_dev_sum`) are pure; `stats_from_shards` runs the same algorithm with Python reductions
over a list of shards, so tests can check it without processes.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from .entropy import (
    EntropyStats,
    NormMode,
    _check_mode_pivot,
    entropy_stats,
    quantile_1d,
    stats_from_reduced,
    valid_log_entropy,
)


def shard_summary(x: Tensor) -> tuple[int, float, float]:
    """(count, min, max) of a shard's log-entropies x (n,); empty -> (0, +inf, -inf)."""
    if x.numel() == 0:
        return 0, math.inf, -math.inf
    return x.numel(), float(x.min()), float(x.max())


def shard_histogram(x: Tensor, lo: float, hi: float, num_bins: int) -> Tensor:
    """Counts of x (n,) in `num_bins` equal bins over [lo, hi] (hi in the last bin). (num_bins,) float64."""
    width = (hi - lo) / num_bins
    if width <= 0:
        idx = torch.zeros(x.numel(), dtype=torch.long, device=x.device)
    else:
        idx = ((x - lo) / width).floor().clamp(0, num_bins - 1).long()
    return torch.bincount(idx, minlength=num_bins).double()


def _order_stat_from_histogram(cum: Tensor, hist: Tensor, k: int, lo: float, width: float) -> float:
    """Estimate of the k-th smallest value (0-based): its bin's left edge plus its rank within
    the bin spread evenly across the bin; always inside the bin holding it."""
    b = int(torch.searchsorted(cum, torch.tensor([float(k)], dtype=cum.dtype, device=cum.device), right=True))
    in_bin = float(hist[b])
    j = k - (float(cum[b]) - in_bin)
    return lo + width * (b + (j + 0.5) / in_bin)


def quantile_from_histogram(hist: Tensor, lo: float, hi: float, q: float, mode: NormMode) -> tuple[float, float]:
    """(quantile estimate, error bound = bin width) from a histogram over [lo, hi]; the same
    quantile rule as `quantile_1d` (linear in paper mode, nearest rank in released mode)."""
    n = int(hist.sum())
    if n == 0:
        return 0.0, 0.0
    width = (hi - lo) / hist.numel()
    if width <= 0:
        return lo, 0.0
    cum = hist.cumsum(0)
    pos = q * (n - 1)
    if mode == "released":
        return _order_stat_from_histogram(cum, hist, round(pos), lo, width), width
    k = math.floor(pos)
    a = _order_stat_from_histogram(cum, hist, k, lo, width)
    b = _order_stat_from_histogram(cum, hist, min(k + 1, n - 1), lo, width)
    return a + (b - a) * (pos - k), width


def sq_dev_sum(x: Tensor, rho: float) -> float:
    """sum((x - rho)^2) of a shard."""
    return float(((x - rho) ** 2).sum())


def stats_from_shards(
    xs: list[Tensor], pivot: float = 0.8, mode: NormMode = "paper", eps: float = 1e-8,
    exact_max_tokens: int = 1_000_000, num_bins: int = 4096,
) -> tuple[EntropyStats, dict[str, Any]]:
    """The distributed algorithm with in-process reductions over shards of log-entropies
    (each from `valid_log_entropy`). Same result as `distributed_entropy_stats` on those ranks."""
    _check_mode_pivot(mode, pivot)
    summaries = [shard_summary(x) for x in xs]
    count = sum(s[0] for s in summaries)
    x_min, x_max = min(s[1] for s in summaries), max(s[2] for s in summaries)
    if count == 0:
        return stats_from_reduced(0, 0.0, 0.0, 0.0, 0.0, mode, eps), _info(True, 0.0, 0)
    if count <= exact_max_tokens:
        rho, err = quantile_1d(torch.cat(xs), pivot, mode), 0.0
    else:
        # a Tensor: xs is not empty here (count > 0)
        hist = cast(Tensor, sum(shard_histogram(x, x_min, x_max, num_bins) for x in xs))
        rho, err = quantile_from_histogram(hist, x_min, x_max, pivot, mode)
    ssd = sum(sq_dev_sum(x, rho) for x in xs)
    return stats_from_reduced(count, rho, ssd, x_min, x_max, mode, eps), _info(err == 0.0, err, count)


def _info(exact: bool, err: float, count: int) -> dict[str, Any]:
    return {"exact": exact, "quantile_bin_error": float(err), "num_tokens": int(count)}


def all_gather_varlen(x: Tensor, group: Any = None) -> Tensor:
    """Concatenate 1-D tensors of different lengths over ranks (rank order), with two tensor
    all-gathers (lengths, then padded values): no pickling."""
    world = dist.get_world_size(group)
    n = torch.tensor([x.numel()], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    sizes = [int(c) for c in counts]
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)])


def distributed_entropy_stats(
    entropy: Tensor, mask: Tensor, pivot: float = 0.8, mode: NormMode = "paper", group: Any = None,
    exact_max_tokens: int = 1_000_000, num_bins: int = 4096, eps: float = 1e-8,
) -> tuple[EntropyStats, dict[str, Any]]:
    """`entropy_stats` over the union of every rank's valid tokens (B, T local shards).

    Returns (stats, info) with info = {"exact": bool, "quantile_bin_error": float (0 when
    exact; else the bin width in log-entropy units bounding |rho - exact rho|),
    "num_tokens": global valid tokens}. Without an initialised process group it is
    `entropy_stats(entropy, mask, pivot, mode)`. Collective: every rank must call it.
    """
    _check_mode_pivot(mode, pivot)
    if not (dist.is_available() and dist.is_initialized()):
        stats = entropy_stats(entropy, mask, pivot, mode, eps)
        return stats, _info(True, 0.0, stats.num_tokens)
    x = valid_log_entropy(entropy, mask, eps)  # (n,) float64
    count_local, mn, mx = shard_summary(x)
    count_t = torch.tensor([float(count_local)], dtype=torch.float64, device=x.device)
    dist.all_reduce(count_t, op=dist.ReduceOp.SUM, group=group)
    ext = torch.tensor([-mn, mx], dtype=torch.float64, device=x.device)
    dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=group)
    count, x_min, x_max = int(count_t.item()), -float(ext[0]), float(ext[1])
    if count == 0:
        return stats_from_reduced(0, 0.0, 0.0, 0.0, 0.0, mode, eps), _info(True, 0.0, 0)
    if count <= exact_max_tokens:
        rho, err = quantile_1d(all_gather_varlen(x, group), pivot, mode), 0.0
    else:
        hist = shard_histogram(x, x_min, x_max, num_bins)
        dist.all_reduce(hist, op=dist.ReduceOp.SUM, group=group)
        rho, err = quantile_from_histogram(hist, x_min, x_max, pivot, mode)
    ssd = torch.tensor([sq_dev_sum(x, rho)], dtype=torch.float64, device=x.device)
    dist.all_reduce(ssd, op=dist.ReduceOp.SUM, group=group)
    stats = stats_from_reduced(count, rho, float(ssd.item()), x_min, x_max, mode, eps)
    return stats, _info(err == 0.0, err, count)
