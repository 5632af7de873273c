"""Micro-batches: which rows of a mini-batch go through one forward/backward together.

By count (`train.micro_batch_size` rows, in order), or by a token budget
(`train.max_tokens_per_micro_batch`): the fewest micro-batches whose prompt + response tokens fit
the budget, balanced by the Karmarkar-Karp largest differencing method, as verl's
`use_dynamic_bsz` (verl/utils/seqlen_balancing.py `get_seqlen_balanced_partitions`,
`rearrange_micro_batches`). Unlike verl, a partition is never over the budget: KK runs with k, k+1,
... partitions until every one fits. All ranks run the same number of micro-batches (the maximum
over ranks): FSDP2 and ZeRO-3 gather parameters in every forward and DDP reduces gradients on the
last backward, so a rank that ran fewer would wait forever. A rank with fewer rows than
micro-batches gets empty ones, which the learner runs as a zero-weight forward/backward.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def karmarkar_karp(sizes: Sequence[int], k: int) -> list[list[int]]:
    """Split the indices of `sizes` into k parts with near-equal sums (largest differencing).

    Each item starts as a k-part partial solution (the item alone in one part); the two partial
    solutions with the largest spread (max - min part sum) are merged by pairing the largest part
    of one with the smallest of the other, until one solution is left. Parts may be empty when
    k > len(sizes). Deterministic: ties break by insertion order. Returns parts with indices
    ascending, ordered by their first index (empty parts last)."""
    if k < 1:
        raise ValueError(f"karmarkar_karp: k={k} must be >= 1")
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    for i, s in enumerate(sizes):
        parts = [(int(s), [i])] + [(0, []) for _ in range(k - 1)]
        heap.append((-int(s), i, parts))
    heapq.heapify(heap)
    counter = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(a[j][0] + b[k - 1 - j][0], a[j][1] + b[k - 1 - j][1]) for j in range(k)]
        merged.sort(key=lambda p: -p[0])  # stable: equal sums keep their order
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), counter, merged))
        counter += 1
    parts = [sorted(idx) for _, idx in heap[0][2]] if heap else [[] for _ in range(k)]
    return sorted(parts, key=lambda p: (not p, p[0] if p else 0))


def budget_partitions(tokens: Sequence[int], budget: int, k_min: int = 1) -> list[list[int]]:
    """The fewest (at least `k_min`) KK-balanced parts of `tokens` whose sums are all <= budget.
    Every single item must fit (the recipe checks max prompt + response <= budget)."""
    too_long = [t for t in tokens if t > budget]
    if too_long:
        raise ValueError(f"a sequence of {max(too_long)} tokens is over the micro-batch token "
                         f"budget {budget}")
    k = max(k_min, -(-sum(tokens) // budget), 1)
    while True:
        parts = karmarkar_karp(tokens, k)
        if all(sum(tokens[i] for i in p) <= budget for p in parts):
            return parts
        k += 1


def plan_micro_batches(
    seq_tokens: Tensor,  # (B,) prompt + response tokens of each of this rank's rows
    minis: list[slice],  # the mini-batches (row ranges), the same count on every rank
    micro_batch_size: int,
    budget: int | None,
    max_over_ranks: Callable[[list[int]], list[int]] = lambda x: x,
) -> list[list[Tensor]]:
    """Per mini-batch, the row indices (1-D long tensors) of its micro-batches.

    budget None: consecutive rows, `micro_batch_size` at a time (today's grouping). Else the
    token-budget KK parts; `max_over_ranks` takes this rank's micro-batch count per mini-batch and
    returns the maximum over ranks, so every rank plans that many (empty tensors pad a rank that
    has fewer rows than micro-batches)."""
    if budget is None:
        return [[torch.arange(s, min(s + micro_batch_size, m.stop)) for s in
                 range(m.start, m.stop, micro_batch_size)] for m in minis]
    toks = [int(t) for t in seq_tokens.tolist()]
    local = [len(budget_partitions(toks[m], budget)) if m.stop > m.start else 1 for m in minis]
    counts = max_over_ranks(local)
    out = []
    for m, k in zip(minis, counts):
        parts = budget_partitions(toks[m], budget, k_min=k) if m.stop > m.start else []
        parts = parts + [[] for _ in range(k - len(parts))]
        out.append([torch.tensor([m.start + i for i in p], dtype=torch.long) for p in parts])
    return out
