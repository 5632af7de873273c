"""Memory-bounded log-probs and entropy through the LM head (never [N, V] logits at once).

The learner needs, for every response token, the log-probability of the sampled token and the
entropy of the policy distribution it was sampled from. The naive formula materialises the
logits of every token::

    z = (hidden @ W.T + b) / T            # (N, V), float32
    logp_all = z.log_softmax(-1)          # (N, V)
    logp = logp_all.gather(-1, targets)   # (N,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)   # (N,)

With V = 151,936 (Qwen) and N = 8192 tokens that is 5 GB per float32 [N, V] tensor, and
autograd keeps several of them. `fused_logprobs_and_entropy` computes the same two vectors
chunk by chunk over the token dimension: at most one chunk of logits and one temporary of
the same size are alive at a time (plus, for bf16, a bf16 copy of the chunk's gradient).
Backward saves only O(N) vectors (the per-token log-sum-exp and entropy) and recomputes each
chunk's logits, so memory is
O(chunk_size * V + V * d) instead of O(N * V); the price is one extra matmul (4 instead of 3),
partly paid back by far fewer passes over (N, V) memory.

Gradients (per row, z = tempered logits, p = softmax(z), lse = logsumexp(z)):

    logp = z_y - lse                      d logp / dz_j = 1[j = y] - p_j
    H = lse - sum_k p_k z_k               dH / dz_j = -p_j (z_j - sum_k p_k z_k)
                                                    = -p_j (log p_j + H)

so with upstream gradients g (for logp) and e (for H):
``dL/dz_j = g 1[j = y] - p_j (g + e (log p_j + H))``, and ``dL/dlogits = dL/dz / T``.

Conventions:
- The entropy is of the same tempered distribution as the log-prob (``softmax(logits / T)``); pass
  ``temperature=None`` for the untempered entropy that the entropy stats use.
- Rows whose target equals ``ignore_index`` (-100) give logp = 0 and entropy = 0 and get zero
  gradient (their logits are still computed; select valid rows first to save the work, as
  `learner.forward.response_logprobs` does).
- The temperature is a constant (no gradient flows to it).
- Logits must be finite (true for a linear head with finite weights); a -inf bias entry would
  make the entropy NaN (0 * -inf), as it does in the naive formula.
- ``chunk_size``: memory ~ 2 * chunk_size * V * 4 bytes (+ V * d * 4 for grad_W). On CPU the
  matmul speed is flat from 512 to 2048 rows, so 512-1024 is a good default; on GPU larger
  chunks (2048-4096) amortise kernel launches.
- Compute dtype: float32 for float32/bfloat16/float16 inputs (the matmul runs in the input
  dtype, each chunk of logits is upcast to float32, grad_W is accumulated in float32 and cast
  back), float64 for float64 inputs. Outputs have the compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- chunk kernels


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(
    h: Tensor,  # (C, d)
    weight: Tensor,  # (V, d)
    bias: Tensor | None,  # (V,)
    inv_t: Tensor | None,  # (C,) 1 / temperature, compute dtype
) -> Tensor:
    """Tempered logits of one chunk, upcast to the compute dtype: (C, V)."""
    raw = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)  # (C, V) input dtype
    z = raw.to(_compute_dtype(raw.dtype))  # no copy for float32: raw is fresh, edit in place
    if inv_t is not None:
        z.mul_(inv_t[:, None])
    return z


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_j a[i, j] b[i, j] without a (C, V) temporary: (C,)."""
    return (a[:, None, :] @ b[:, :, None]).reshape(-1)


def _forward_chunk(
    h: Tensor, weight: Tensor, bias: Tensor | None, inv_t: Tensor | None,
    safe_targets: Tensor, compute_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp, lse, entropy or None) of one chunk, each (C,).

    Two (C, V) buffers and ~6 passes over them: with m = max z, s = sum exp(z - m),
    lse = m + log s, logp = (z_y - m) - log s, H = log s - sum exp(z - m) (z - m) / s.
    """
    z = _chunk_logits(h, weight, bias, inv_t)  # (C, V)
    m = z.amax(dim=-1)  # (C,)
    z.sub_(m[:, None])  # (C, V) shifted logits, <= 0
    e = torch.exp(z)  # (C, V) unnormalised probabilities
    s = e.sum(dim=-1)  # (C,)
    log_s = s.log()
    logp = z.gather(1, safe_targets[:, None]).reshape(-1) - log_s  # (C,)
    entropy = log_s - _row_dot(e, z) / s if compute_entropy else None  # (C,)
    return logp, m + log_s, entropy


def _forward_loop(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
    inv_t: Tensor | None, chunk_size: int, compute_entropy: bool, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse) for all N rows, zero logp/entropy on ignored rows."""
    n = hidden.shape[0]
    cdtype = _compute_dtype(hidden.dtype)
    ignored = targets == ignore_index  # (N,)
    safe_targets = targets.masked_fill(ignored, 0)  # (N,)
    logp = hidden.new_zeros(n, dtype=cdtype)
    lse = hidden.new_zeros(n, dtype=cdtype)
    entropy = hidden.new_zeros(n, dtype=cdtype)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        it = None if inv_t is None else inv_t[s:e]
        lp, ls, ent = _forward_chunk(
            hidden[s:e], weight, bias, it, safe_targets[s:e], compute_entropy
        )
        logp[s:e] = lp
        lse[s:e] = ls
        if ent is not None:
            entropy[s:e] = ent
    logp = logp.masked_fill(ignored, 0.0)
    entropy = entropy.masked_fill(ignored, 0.0)
    return logp, entropy, lse


def _logits_grad_chunk(
    z: Tensor,  # (C, V) tempered logits, overwritten with the result
    lse: Tensor, entropy: Tensor, g: Tensor, e: Tensor | None,  # (C,) each
    inv_t: Tensor | None,  # (C,)
    safe_targets: Tensor,  # (C,)
) -> Tensor:
    """dL/draw for L with dL/dlogp = g, dL/dH = e; raw = z * T: (C, V), in z's storage.

    dL/dz_j = g 1[j = y] - p_j (g + e (log p_j + H)), with log p_j = z_j - lse; dividing by T
    and writing it as p_j (alpha z_j + beta) with per-row alpha, beta costs ~4 passes.
    """
    p = torch.sub(z, lse[:, None])  # (C, V) log p
    p.exp_()  # (C, V) p
    scale = g if inv_t is None else g * inv_t  # (C,)
    if e is None:
        gz = p.mul_(-scale[:, None])  # -p g / T
    else:
        alpha = -e if inv_t is None else -e * inv_t  # (C,)
        beta = -scale - alpha * (lse - entropy)  # (C,) so that alpha z + beta = -(g + e(z-lse+H))/T
        gz = torch.addcmul(beta[:, None], z, alpha[:, None], out=z).mul_(p)
        del p
    return gz.scatter_add_(1, safe_targets[:, None], scale[:, None])


def _accumulate_weight_grad(grad_w: Tensor, gz: Tensor, h: Tensor, block: int = 16384) -> None:
    """grad_w (V, d, float32) += gz.T @ h; bf16 by row blocks of V (small temporaries)."""
    if gz.dtype == grad_w.dtype:
        grad_w.addmm_(gz.T, h)  # (V, d) accumulate in place
        return
    for v0 in range(0, grad_w.shape[0], block):
        grad_w[v0 : v0 + block] += gz[:, v0 : v0 + block].T @ h  # bf16 matmul, fp32 sum


# ----------------------------------------------------------------------------- autograd


class _FusedLogprobEntropy(torch.autograd.Function):
    """Forward by chunks; backward recomputes each chunk's logits from hidden and W."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_t, chunk_size, compute_entropy,
                ignore_index):
        logp, entropy, lse = _forward_loop(
            hidden, weight, bias, targets, inv_t, chunk_size, compute_entropy, ignore_index
        )
        ctx.save_for_backward(hidden, weight, bias, targets, inv_t, lse, entropy)
        ctx.chunk_size = chunk_size
        ctx.compute_entropy = compute_entropy
        ctx.ignore_index = ignore_index
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, inv_t, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdtype = lse.dtype
        ignored = targets == ctx.ignore_index  # (N,)
        safe_targets = targets.masked_fill(ignored, 0)
        # upstream gradients in the compute dtype, zero on ignored rows (their outputs are 0)
        g = (torch.zeros_like(lse) if grad_logp is None else grad_logp.to(cdtype))
        g = g.masked_fill(ignored, 0.0)  # (N,)
        e = (grad_entropy.to(cdtype).masked_fill(ignored, 0.0)
             if grad_entropy is not None and ctx.compute_entropy else None)  # (N,)

        grad_h = torch.empty_like(hidden) if need_h else None  # (N, d)
        grad_w = weight.new_zeros(weight.shape, dtype=cdtype) if need_w else None  # (V, d)
        grad_b = weight.new_zeros(weight.shape[0], dtype=cdtype) if need_b else None  # (V,)
        n = hidden.shape[0]
        for s in range(0, n, ctx.chunk_size):
            t = min(s + ctx.chunk_size, n)
            h = hidden[s:t]  # (C, d)
            it = None if inv_t is None else inv_t[s:t]
            z = _chunk_logits(h, weight, bias, it)  # (C, V) recomputed
            gz = _logits_grad_chunk(
                z, lse[s:t], entropy[s:t], g[s:t], None if e is None else e[s:t], it,
                safe_targets[s:t],
            )  # (C, V) dL/d(hidden @ W.T + b), in z's storage
            if grad_b is not None:  # need_b
                grad_b += gz.sum(0)
            gz_in = gz.to(weight.dtype)  # (C, V) input dtype for the matmuls
            if grad_h is not None:  # need_h
                torch.mm(gz_in, weight, out=grad_h[s:t])  # (C, d)
            if grad_w is not None:  # need_w
                _accumulate_weight_grad(grad_w, gz_in, h)
            del z, gz, gz_in
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


# ----------------------------------------------------------------------------- public API


def _inverse_temperature(temperature, n: int, cdtype: torch.dtype, device) -> Tensor | None:
    """None (T = 1) or a (N,) tensor of 1/T in the compute dtype; ValueError on bad input."""
    if temperature is None:
        return None
    if isinstance(temperature, Tensor):
        t = temperature.detach().to(device=device, dtype=cdtype)
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(
                f"temperature must be a float, a 0-dim tensor or shape ({n},); "
                f"got shape {tuple(temperature.shape)}"
            )
        if not bool((t > 0).all()):
            raise ValueError("temperature must be > 0 everywhere")
        return t.reciprocal()
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    return torch.full((n,), 1.0 / t, dtype=cdtype, device=device)


def fused_logprobs_and_entropy(
    hidden: Tensor,  # (N, d) final hidden states (after the final norm)
    lm_head_weight: Tensor,  # (V, d)
    targets: Tensor,  # (N,) token ids, IGNORE_INDEX rows are skipped
    temperature: float | Tensor | None = None,  # scalar or (N,)
    chunk_size: int = 1024,
    *,
    bias: Tensor | None = None,  # (V,)
    compute_entropy: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Log-prob of `targets` and entropy under softmax((hidden @ W.T + b) / T), by chunks.

    Naive formula (what this equals, up to float rounding)::

        z = ((hidden @ W.T + bias).float() / T)       # (N, V)
        logp_all = z.log_softmax(-1)
        logp = logp_all.gather(-1, targets[:, None])[:, 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)

    Returns ``(logp, entropy)``, each (N,) float32 (float64 for float64 inputs); both are
    differentiable w.r.t. `hidden`, `lm_head_weight` and `bias`. At most `chunk_size` rows of
    logits exist at a time (forward and backward). Rows with ``targets == ignore_index`` give
    0 and 0. With ``compute_entropy=False`` the entropy output is all zeros (and skipped).
    Under ``torch.no_grad()`` or when no input requires grad nothing is saved.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, d); got shape {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"lm_head_weight must be (V, d={hidden.shape[1]}); "
            f"got shape {tuple(lm_head_weight.shape)}"
        )
    if lm_head_weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and lm_head_weight must share a dtype; got {hidden.dtype} and "
            f"{lm_head_weight.dtype}"
        )
    n = hidden.shape[0]
    if targets.shape != (n,) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be integer token ids of shape ({n},); "
            f"got {targets.dtype} of shape {tuple(targets.shape)}"
        )
    v = lm_head_weight.shape[0]
    if bias is not None and (bias.shape != (v,) or bias.dtype != hidden.dtype):
        raise ValueError(
            f"bias must be ({v},) {hidden.dtype}; "
            f"got {bias.dtype} of shape {tuple(bias.shape)}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    cdtype = _compute_dtype(hidden.dtype)
    inv_t = _inverse_temperature(temperature, n, cdtype, hidden.device)
    targets = targets.long()

    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad
        or lm_head_weight.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    if not needs_grad:
        logp, entropy, _ = _forward_loop(
            hidden, lm_head_weight, bias, targets, inv_t, chunk_size, compute_entropy,
            ignore_index,
        )
        return logp, entropy
    return _FusedLogprobEntropy.apply(
        hidden, lm_head_weight, bias, targets, inv_t, chunk_size, compute_entropy, ignore_index
    )

