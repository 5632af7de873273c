"""Log-probs of the sampled tokens and entropy, chunked so no fp32 [B, T, V] copy ever exists.

Naive formula this optimises (TRL's `selective_log_softmax` style):

    z = logits.float() / temperature[..., None]          # (B, T, V) fp32 copy
    logp = log_softmax(z).gather(-1, targets[..., None])  # (B, T)
    entropy = -(softmax(z) * log_softmax(z)).sum(-1)      # (B, T)

Here tokens are processed `chunk_size` at a time by a custom autograd Function: forward keeps
only O(N) vectors (log-sum-exp, entropy); backward writes the logits' gradient chunk by chunk
into one buffer of the logits' dtype (a chunked slice + autograd would instead allocate a
full-size zero gradient per chunk). Per row, with z = logits / T, p = softmax(z),
lse = logsumexp(z), H = lse - sum_k p_k z_k:

    d logp / d z_j = 1[j = y] - p_j        d H / d z_j = -p_j (log p_j + H)

so with upstream gradients g (logp) and e (H): dL/dz_j = g 1[j = y] - p_j (g + e (log p_j + H))
and dL/dlogits = dL/dz / T (plus the untempered entropy's term when requested). The
temperature gets no gradient; double backward is not supported.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 512  # tokens; with V = 151,936 one fp32 chunk is ~0.3 GB (2-3 alive at once)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logp_(z: Tensor) -> Tensor:
    """In place: z (C, V) -> log softmax(z). Returns z."""
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


def _entropy_of_logp_(logp: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v from log-probs (C, V), overwriting logp; p = 0 contributes 0."""
    p = logp.exp()  # (C, V) one temporary
    return -p.mul_(logp.masked_fill_(p == 0, 0.0)).sum(-1)


def _grad_z_(logp: Tensor, ent: Tensor, g: Tensor, e: Tensor) -> Tensor:
    """In place on logp (C, V): dL/dz = g 1[j = y] - p_j (g + e (log p_j + H)) without the
    1[j = y] term (added by the caller). p_j = 0 rows give 0, not NaN."""
    p = logp.exp()  # (C, V)
    inner = logp.add_(ent.unsqueeze(-1)).masked_fill_(p == 0, 0.0)  # log p + H
    inner.mul_(e.unsqueeze(-1)).add_(g.unsqueeze(-1))
    return inner.mul_(p).neg_()


def _tempered(logits: Tensor, inv_temp: Tensor | None, cdt: torch.dtype) -> Tensor:
    z = logits.to(cdt, copy=True)  # (C, V) the chunk's full-vocabulary copy
    return z if inv_temp is None else z.mul_(inv_temp.unsqueeze(-1))


class _ChunkedLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temp, chunk_size, untempered):  # noqa: D102
        # logits (N, V), targets (N,), inv_temp (N,) or None
        n = logits.shape[0]
        cdt = _compute_dtype(logits.dtype)
        logp = torch.empty(n, dtype=cdt, device=logits.device)
        ent = torch.empty_like(logp)
        ent0 = torch.empty_like(logp) if untempered else None
        for s in range(0, n, chunk_size):
            sl = slice(s, s + chunk_size)
            lp_all = _logp_(_tempered(logits[sl], None if inv_temp is None else inv_temp[sl], cdt))
            logp[sl] = lp_all.gather(-1, targets[sl].unsqueeze(-1)).squeeze(-1)
            ent[sl] = _entropy_of_logp_(lp_all)
            del lp_all
            if ent0 is not None:  # untempered
                ent0[sl] = ent[sl] if inv_temp is None else _entropy_of_logp_(_logp_(_tempered(logits[sl], None, cdt)))
        ctx.save_for_backward(logits, targets, inv_temp, ent, ent0)
        ctx.chunk_size = chunk_size
        outs = (logp, ent) + ((ent0,) if untempered else ())
        return outs

    @staticmethod
    def backward(ctx, g_logp, g_ent, *g_rest):  # noqa: D102
        logits, targets, inv_temp, ent, ent0 = ctx.saved_tensors
        g_ent0 = g_rest[0] if g_rest else None
        cdt = _compute_dtype(logits.dtype)
        grad = torch.empty_like(logits)  # (N, V) in the logits' dtype: the only full-size buffer
        n, cs = logits.shape[0], ctx.chunk_size
        zeros = torch.zeros(n, dtype=cdt, device=logits.device)
        g_logp = zeros if g_logp is None else g_logp.to(cdt)
        g_ent = zeros if g_ent is None else g_ent.to(cdt)
        for s in range(0, n, cs):
            sl = slice(s, s + cs)
            it = None if inv_temp is None else inv_temp[sl]
            g = g_logp[sl]
            gz = _grad_z_(_logp_(_tempered(logits[sl], it, cdt)), ent[sl], g, g_ent[sl])  # (C, V)
            gz.scatter_add_(-1, targets[sl].unsqueeze(-1), g.unsqueeze(-1))
            if it is not None:
                gz.mul_(it.unsqueeze(-1))  # dz/dlogits = 1 / T
            if g_ent0 is not None:
                lp0 = _logp_(_tempered(logits[sl], None, cdt))
                gz.add_(_grad_z_(lp0, ent0[sl], torch.zeros_like(g), g_ent0[sl].to(cdt)))
                del lp0
            grad[sl] = gz
            del gz
        return grad, None, None, None, None


def logprobs_and_entropy(
    logits: Tensor, targets: Tensor, temperature: float | Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE, *, untempered_entropy: bool = False,
) -> tuple[Tensor, ...]:
    """log pi(target) and entropy of softmax(logits / T), computed chunk by chunk.

    logits (B, T, V) (or (N, V)) any float dtype, targets (B, T) int, temperature None (1),
    a float, or (B, T) per-token (e.g. the stored rollout temperatures). Returns
    (logp (B, T), entropy (B, T)) in float32 (float64 for float64 logits), both
    differentiable w.r.t. logits; with `untempered_entropy=True` also the entropy of
    softmax(logits) (what the entropy stats use) as a third tensor.
    """
    if logits.dim() < 2 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"logprobs_and_entropy: need logits (..., V) and targets (...); got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"logprobs_and_entropy: chunk_size={chunk_size} must be >= 1")
    lead = targets.shape
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)  # (N, V) view for contiguous logits
    flat_targets = targets.reshape(-1).long().to(flat.device)  # (N,)
    n = flat.shape[0]
    cdt = _compute_dtype(flat.dtype)
    inv_temp: Tensor | None
    if temperature is None:
        inv_temp = None
    elif isinstance(temperature, Tensor):
        if temperature.shape != lead:
            raise ValueError(f"logprobs_and_entropy: temperature must be {tuple(lead)}, got {tuple(temperature.shape)}")
        inv_temp = 1.0 / temperature.reshape(-1).to(device=flat.device, dtype=cdt)
    else:
        if temperature <= 0:
            raise ValueError(f"logprobs_and_entropy: temperature={temperature} must be > 0")
        inv_temp = torch.full((n,), 1.0 / float(temperature), dtype=cdt, device=flat.device)
    if n == 0:
        empty = torch.zeros(lead, dtype=cdt, device=flat.device)
        return tuple(empty.clone() for _ in range(3 if untempered_entropy else 2))
    outs = _ChunkedLogprobsEntropy.apply(flat, flat_targets, inv_temp, chunk_size, untempered_entropy)
    return tuple(o.reshape(lead) for o in outs)
