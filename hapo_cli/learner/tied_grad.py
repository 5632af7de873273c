"""Tied input/output embeddings: the lookup's gradient added into the head's, in place.

A tied weight W (V, d) gets two gradients in one backward: the LM head's (dense, every row) and
the token lookup's (only the rows of the batch's tokens). Autograd materialises the lookup's as a
dense (V, d) tensor (`embedding_dense_backward`) and adds it into the head's: for a moment the
head's gradient and the lookup's are both alive beside the model. With the 151,936 x 1536
embedding of bench/bench_strategy.py that moment (with gloo's reduce-scatter copy, which
reaches the same height: gloo_reduce.py) was ZeRO-3's step peak. Here the head's gradient is held on
its way to the parameter, and the lookup's backward adds its rows into it (`index_add_` of the
per-token sums) and hands autograd nothing for W: the same sums, bit for bit
(tests/test_tied_grad.py), without the dense one.

Used on the learner's fused path (forward.py), where the head's forward is ours; any other
embedding (untied, scaled, sparse, max_norm) keeps its own forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TiedGradient:
    """One forward's channel: the head's gradient for W, until the lookup's backward adds in."""

    def __init__(self) -> None:
        self.head: Tensor | None = None


class _HoldHeadGradient(torch.autograd.Function):
    """Identity on W; its backward keeps a reference to the head's gradient in the channel."""

    @staticmethod
    def forward(ctx, weight: Tensor, channel: TiedGradient) -> Tensor:
        ctx.channel = channel
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        (grad,) = grads  # (V, d)
        ctx.channel.head = grad
        return grad, None


class _Lookup(torch.autograd.Function):
    """`F.embedding(ids, W, padding_idx)`; backward adds the per-token gradient sums into the
    head's gradient in the channel (nothing returned for W), or returns the dense gradient
    where the head's did not come."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int | None,
                channel: TiedGradient) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.channel, ctx.padding_idx, ctx.num_rows = channel, padding_idx, weight.shape[0]
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        (grad,) = grads  # (*ids.shape, d)
        (ids,) = ctx.saved_tensors
        flat, g = ids.reshape(-1), grad.reshape(ids.numel(), -1)  # (n,), (n, d)
        if ctx.padding_idx is not None:  # the padding row gets no gradient (nn.Embedding)
            keep = flat != ctx.padding_idx
            flat, g = flat[keep], g[keep]
        head, ctx.channel.head = ctx.channel.head, None  # drop the channel's reference
        if head is None:
            dense = g.new_zeros(ctx.num_rows, g.shape[1]).index_add_(0, flat, g)  # (V, d)
            return None, dense, None, None
        rows, inverse = flat.unique(return_inverse=True)  # (u,), (n,)
        sums = g.new_zeros(rows.numel(), g.shape[1]).index_add_(0, inverse, g)  # (u, d)
        head.index_add_(0, rows, sums.to(head.dtype))  # = head + the dense gradient's rows
        return None, None, None, None


def plain_tied_embedding(model: nn.Module, head: nn.Module) -> nn.Embedding | None:
    """The input embedding module when a gradient is being recorded for it and it is an
    `nn.Embedding` sharing `head.weight` and using none of max_norm, scale_grad_by_freq,
    sparse; else None (scoring under no_grad keeps the module's own forward)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if (not torch.is_grad_enabled() or type(emb) is not nn.Embedding
            or not emb.weight.requires_grad or emb.weight is not getattr(head, "weight", None)
            or emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse):
        return None
    return emb


@contextmanager
def tied_lookup(emb: nn.Embedding, channel: TiedGradient):
    """Within the block, calling `emb` (hooks included) looks up through `_Lookup`."""
    def forward(input: Tensor) -> Tensor:  # nn.Embedding.forward's signature (token ids)
        return _Lookup.apply(input, emb.weight, emb.padding_idx, channel)

    emb.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del emb.forward


def hold_head_gradient(weight: Tensor, channel: TiedGradient) -> Tensor:
    """`weight` for the head's computation, its gradient kept in `channel` for the lookup."""
    return _HoldHeadGradient.apply(weight, channel)


__all__ = ["TiedGradient", "hold_head_gradient", "plain_tied_embedding", "tied_lookup"]
