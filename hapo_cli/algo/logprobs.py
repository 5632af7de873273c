"""Log-probs of the sampled tokens and entropy, chunked so no fp32 [B, T, V] copy ever exists.

Naive formula this optimises (TRL's `selective_log_softmax` style):

    z = logits.float() / temperature[..., None]          # (B, T, V) fp32 copy
    logp = log_softmax(z).gather(-1, targets[..., None])  # (B, T)
    entropy = -(softmax(z) * log_softmax(z)).sum(-1)      # (B, T)

Here the tokens are processed `chunk_size` at a time; with autograd on, each chunk runs under
activation checkpointing, so backward recomputes the chunk's fp32 softmax instead of keeping
every chunk's (the logits themselves, in their own dtype, are already held by the caller).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 512  # tokens; with V = 151,936 one fp32 chunk is ~0.3 GB


def _entropy_from_z(z: Tensor, lse: Tensor | None = None) -> Tensor:
    """H = logsumexp(z) - sum_v p_v z_v, with -inf logits contributing 0 (no NaN in grads)."""
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)  # (C,)
    p = torch.exp(z - lse.unsqueeze(-1))  # (C, V)
    z_finite = z.masked_fill(~torch.isfinite(z), 0.0)
    return lse - (p * z_finite).sum(dim=-1)


def _chunk(logits: Tensor, targets: Tensor, temp: Tensor | None, untempered: bool) -> tuple[Tensor, ...]:
    """One chunk: logits (C, V), targets (C,), temp (C,) or None -> logp, entropy[, entropy0]."""
    z0 = logits.double() if logits.dtype == torch.float64 else logits.float()  # (C, V)
    z = z0 if temp is None else z0 / temp.unsqueeze(-1)
    lse = torch.logsumexp(z, dim=-1)  # (C,)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # (C,)
    out = (logp, _entropy_from_z(z, lse))
    if untempered:
        out = out + (_entropy_from_z(z0),)
    return out


def logprobs_and_entropy(
    logits: Tensor, targets: Tensor, temperature: float | Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE, *, untempered_entropy: bool = False,
) -> tuple[Tensor, ...]:
    """log pi(target) and entropy of softmax(logits / T), computed chunk by chunk.

    logits (B, T, V) (or (N, V)) any float dtype, targets (B, T) int, temperature None (1),
    a float, or (B, T) per-token (e.g. the stored rollout temperatures). Returns
    (logp (B, T), entropy (B, T)) in float32 (float64 for float64 logits), both differentiable w.r.t. logits; with
    `untempered_entropy=True` also the entropy of softmax(logits) (what the entropy stats
    use) as a third tensor.
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
    flat_targets = targets.reshape(-1).long()  # (N,)
    n = flat.shape[0]
    temp: Tensor | None
    if temperature is None:
        temp = None
    elif isinstance(temperature, Tensor):
        if temperature.shape != lead:
            raise ValueError(f"logprobs_and_entropy: temperature must be {tuple(lead)}, got {tuple(temperature.shape)}")
        temp = temperature.reshape(-1).float().to(flat.device)
    else:
        if temperature <= 0:
            raise ValueError(f"logprobs_and_entropy: temperature={temperature} must be > 0")
        temp = torch.full((n,), float(temperature), device=flat.device)
    use_ckpt = torch.is_grad_enabled() and flat.requires_grad
    pieces: list[tuple[Tensor, ...]] = []
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        args = (flat[sl], flat_targets[sl], None if temp is None else temp[sl], untempered_entropy)
        if use_ckpt:
            pieces.append(checkpoint(_chunk, *args, use_reentrant=False))
        else:
            pieces.append(_chunk(*args))
    n_out = 3 if untempered_entropy else 2
    if not pieces:
        out_dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
        empty = torch.zeros(lead, dtype=out_dtype, device=flat.device)
        return tuple(empty.clone() for _ in range(n_out))
    return tuple(torch.cat([p[i] for p in pieces]).reshape(lead) for i in range(n_out))
